"""Helpers the storage test upstreams (S3, OSS, Azure Blob) share: the record of a received request,
query parsing, encryption at rest, dates, checksums and XML building."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import format_datetime
from urllib.parse import unquote

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class ServiceError(Exception):
    """An error response: status, code, message and any extra details the error document carries."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, str] | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


@dataclass
class ReceivedRequest:
    method: str
    path: str  # as received: percent-encoded, without the query
    query: list[tuple[str, str]]  # decoded, in order
    headers: list[tuple[str, str]]
    status: int | None = None  # set once the response has been sent

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key.lower() == name.lower()), None)


class CallParameters:
    """Mixin for an upstream's routed call (a dataclass with an `incoming` request): its query
    parameters and headers."""

    @property
    def params(self) -> dict[str, str]:
        return dict(self.incoming.query)

    def header(self, name: str) -> str | None:
        return self.incoming.headers.get(name)


def parse_query(raw_query: str) -> list[tuple[str, str]]:
    pairs = []
    for item in raw_query.split("&"):
        if item:
            name, _, value = item.partition("=")
            pairs.append((unquote(name), unquote(value)))
    return pairs


def bucket_and_key(host: str, raw_path: str) -> tuple[str | None, str | None]:
    """(bucket, key) from the Host header and percent-encoded path: virtual-hosted when the host
    name carries the bucket, else path style (IP or localhost endpoints)."""
    hostname = host if host.startswith("[") else host.rpartition(":")[0] or host
    path = unquote(raw_path)[1:]
    if is_virtual_hosted(hostname):
        return hostname.split(".")[0], path or None
    bucket, _, key = path.partition("/")
    return bucket or None, key or None


def is_virtual_hosted(hostname: str) -> bool:
    """Whether a Host names a bucket in front of the service's name (not localhost, not an IP)."""
    if hostname == "localhost" or "." not in hostname:
        return False
    try:
        ipaddress.ip_address(hostname.strip("[]"))
    except ValueError:
        return True
    return False


# --- encryption at rest -----------------------------------------------------------------

def seal(key: bytes, plaintext: bytes) -> bytes:
    """AES-256-GCM under `key`, the random 12-byte nonce in front."""
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, None)


def unseal(key: bytes, sealed: bytes) -> bytes:
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], None)


def b64decode_or_none(text: str) -> bytes | None:
    """Strict base64 decoding; None if `text` is not base64."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


# --- dates ------------------------------------------------------------------------------

def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def http_date(moment: dt.datetime) -> str:
    return format_datetime(moment, usegmt=True)


def iso_date(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


# --- checksums --------------------------------------------------------------------------

def reflected_crc(polynomial: int, width: int) -> Callable[[bytes], bytes]:
    """A table-driven reflected CRC with all-ones init and final XOR (CRC-32C, CRC-64/NVME,
    CRC-64/ECMA-182 as OSS reports it)."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ polynomial if crc & 1 else crc >> 1
        table.append(crc)
    mask = (1 << width) - 1

    def digest(data: bytes) -> bytes:
        crc = mask
        for byte in data:
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        return (crc ^ mask).to_bytes(width // 8, "big")

    return digest


# --- XML --------------------------------------------------------------------------------

def xml_element(tag: str, text: str | int | None = None, *children: ET.Element) -> ET.Element:
    element = ET.Element(tag)
    if text is not None:
        element.text = str(text)
    element.extend(children)
    return element


def xml_children(element: ET.Element, tag: str) -> list[ET.Element]:
    return element.findall(f"{{*}}{tag}")  # any namespace, or none


def xml_child_text(element: ET.Element, tag: str) -> str | None:
    found = xml_children(element, tag)
    return (found[0].text or "") if found else None


def xml_response(root: ET.Element, headers: list[tuple[str, str]] | None = None, *,
                 namespace: str | None = None) -> Response:
    """A 200 with `root` as an XML document (in `namespace`, if given)."""
    if namespace is not None:
        root.set("xmlns", namespace)
    body = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return Response(200, [("Content-Type", "application/xml"), *(headers or [])], body)


def parse_xml(data: bytes, root_tag: str, malformed: Callable[[], Exception]) -> ET.Element:
    """The XML document in `data`, whose root must be `root_tag` in any namespace; raises
    `malformed()` otherwise."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError:
        raise malformed() from None
    if root.tag.rpartition("}")[2] != root_tag:
        raise malformed()
    return root
