"""Envelope encryption in the proxy, for OSS rules with `envelope: oss-cse`: keycourier encrypts what the
application writes and decrypts what it reads, in the format of Alibaba's oss2 CryptoBucket
(keycourier.envelope), so the application needs no encryption code and CryptoBucket reads the objects with
the same RSA key pair. docs/oss.md ("Envelope encryption in the proxy") gives each behaviour and its reason.

`plan` says what a request becomes, or refuses it; the exchange it returns changes the request's headers
and body and says what the answer becomes (`respond`). Data keys and IVs live only inside the exchanges'
ciphers: nothing here logs them, returns them or puts them in a header.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

from keycourier import envelope
from keycourier.dialects import Operation, xml_error_body
from keycourier.keys import Key
from keycourier.message import Request
from keycourier.policy import Rule
from keycourier.refusals import Refused

log = logging.getLogger("keycourier")

# The master key version that wrapped an object's data key (base64 SHA-256 of its public key: no secret). A read
# tries that version alone: a wrong RSA key unwraps PKCS#1 v1.5 into random bytes about once in 50,000 tries.
MASTER_KEY_HEADER = "x-oss-meta-keycourier-master-key"
# Metadata only keycourier writes under an envelope rule (oss2's current and first formats, and its own).
OWN_METADATA = (envelope.METADATA_PREFIX, envelope.DEPRECATED_KEY_HEADER.removesuffix("key"), MASTER_KEY_HEADER)
CRC_HEADER = "x-oss-hash-crc64ecma"

_MULTIPART = ("an upload is encrypted in one PutObject only (OSS takes up to 5 GB): where each part's encryption "
              "starts depends on a part size not known when the upload is initiated, and a stateless proxy keeps "
              "nothing between requests; raise the application's multipart threshold above its largest object "
              "(oss2: resumable_upload(..., multipart_threshold=...))")
# Operations an envelope rule refuses: each would store plaintext or ciphertext no reader can decrypt.
REFUSED = {
    "AppendObject": "appended pieces cannot be encrypted as one object (oss2's CryptoBucket refuses appends "
                    "too); write whole objects with PutObject",
    "InitiateMultipartUpload": _MULTIPART,
    "UploadPart": _MULTIPART,
    "UploadPartCopy": _MULTIPART,
    "CompleteMultipartUpload": _MULTIPART,
}
# Answers that carry the stored object's CRC-64, which is the ciphertext's.
_CRC_ANSWERS = frozenset({"GetObjectMeta", "CopyObject"})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(?:\d+|\*)")


class Reply(NamedTuple):
    """What the client gets instead of the provider's answer: the status, the headers, a transform of the
    body (None: as it came), and keycourier's reason when it refused to pass the object on."""

    status: int
    headers: list[tuple[str, str]]
    body: Callable[[bytes], bytes] | None = None
    error: str | None = None


class Exchange:
    """An object request under an envelope rule whose answer carries the stored object's CRC-64: that is the
    ciphertext's, which oss2 would compare with the plaintext's, so it is taken out (oss2 compares only when
    the answer has one: utils.check_crc)."""

    headers: dict[str, str | None] = {}  # changes to the request's headers (None: removed)
    body: Callable[[bytes], bytes] | None = None  # the request body's stream transform
    key: Key | None = None  # the master key version a write uses, for the audit

    def respond(self, status: int, headers: list[tuple[str, str]]) -> Reply:
        return Reply(status, _without(headers, CRC_HEADER) if status < 300 else headers)


def plan(request: Request, operation: Operation, rule: Rule, source_rule: Rule | None, *,
         write_key: Callable[[], Key], read_keys: Callable[[], tuple[Key, ...]]) -> Exchange | None:
    """What an envelope rule (on the object, or on a copy's source) makes of the request; None when none
    applies. Raises Refused for what cannot keep objects client-side encrypted."""
    if not rule.envelope:
        if source_rule and source_rule.envelope:
            raise Refused(403, "AccessDenied", f"{source_rule.name} encrypts the copy's source client-side and "
                          f"{rule.name} does not: the copy would be ciphertext that no reader of it decrypts",
                          "unencryptable")
        return None
    check_request(request, operation, rule, source_rule)
    if operation.name == "PutObject":
        return Upload(request, rule, write_key())
    if operation.name in ("GetObject", "HeadObject"):
        return Download(request, operation, rule, read_keys())
    return Exchange() if operation.name in _CRC_ANSWERS else None


def check_request(request: Request, operation: Operation, rule: Rule, source_rule: Rule | None) -> None:
    encrypts = f"{rule.name} encrypts this bucket client-side (envelope: {rule.envelope})"
    if request.query_value("x-oss-process") is not None:
        raise Refused(403, "AccessDenied", f"{encrypts}: OSS would process the stored ciphertext, not the data "
                      "(x-oss-process: image processing, SelectObject and the like)", "unencryptable")
    if operation.name in REFUSED:
        raise Refused(403, "AccessDenied", f"{encrypts}, so keycourier refuses {operation.name}: "
                      f"{REFUSED[operation.name]}", "unencryptable")
    sent = sorted({name.lower() for name, _ in request.headers if name.lower().startswith(OWN_METADATA)})
    if sent:
        raise Refused(400, "InvalidRequest", f"the request carries client-side encryption metadata "
                      f"({', '.join(sent)}) but {encrypts} itself; an application that encrypts client-side "
                      "(CryptoBucket) needs a passthrough rule", "client_key")
    if operation.name == "CopyObject":
        check_copy(request, rule, source_rule, encrypts)


def check_copy(request: Request, rule: Rule, source_rule: Rule | None, encrypts: str) -> None:
    """OSS copies the source's metadata with the default directive, so a copy stays readable where its
    source's master key and material description are the destination's too."""
    same = source_rule and (source_rule.envelope, source_rule.key, source_rule.matdesc) == (
        rule.envelope, rule.key, rule.matdesc)
    if not same:
        raise Refused(403, "AccessDenied", f"{encrypts} and the copy's source is not encrypted with the same master "
                      "key and material description: the copy would be unreadable or plaintext", "unencryptable")
    if request.header("x-oss-metadata-directive") not in (None, "COPY"):
        raise Refused(400, "InvalidRequest", f"{encrypts}: x-oss-metadata-directive other than COPY would drop "
                      "the copy's client-side encryption metadata and leave ciphertext no one can decrypt",
                      "unencryptable")


class Upload(Exchange):
    """PutObject: the body encrypted as it streams under a fresh data key and IV, their wrapped forms added as
    metadata, and the client's Content-MD5 (of the plaintext) moved into the metadata as oss2 does. OSS can
    check no digest of the plaintext, so keycourier checks it as the body passes."""

    def __init__(self, request: Request, rule: Rule, key: Key):
        self.key = key
        master = replace(key.master, wrap=envelope.Wrap(rule.wrap), matdesc=dict(rule.matdesc) or None)
        material = envelope.new_material(master)
        self.md5 = request.header("content-md5")
        self._expected = self.md5 and _md5_digest(self.md5)
        length = None if request.header("transfer-encoding") else request.header("content-length")
        length = int(length) if length and length.isdigit() else None
        if length == 0 and self._expected not in (None, hashlib.md5().digest()):
            raise Refused(400, "InvalidDigest", "the Content-MD5 you specified does not match the empty body",
                          "unencryptable")
        self.headers = {**envelope.render_metadata(material, length, self.md5), MASTER_KEY_HEADER: key.sha256_b64,
                        "content-md5": None}
        self._cipher = material.cipher()
        self._digest = hashlib.md5()
        self._ended = length == 0  # mitmproxy never streams an empty body through the transform
        self.body = self._checked if self._expected else self._cipher

    def _checked(self, chunk: bytes) -> bytes:
        self._ended = not chunk  # mitmproxy calls once more with b"" at the end
        self._digest.update(chunk)
        return self._cipher(chunk)

    def respond(self, status: int, headers: list[tuple[str, str]]) -> Reply:
        """A stored object's CRC-64 and Content-MD5 are the ciphertext's: the client gets its own Content-MD5
        once checked, and no CRC (computing the plaintext's costs a CRC-64 pass: docs/oss.md)."""
        if status >= 300:
            return Reply(status, headers)
        headers = _without(headers, CRC_HEADER, "content-md5")
        if self._expected is None:
            return Reply(status, headers)
        if self._ended and self._digest.digest() == self._expected:
            return Reply(status, [*headers, ("Content-MD5", self.md5)])
        message = ("the Content-MD5 you specified does not match the body keycourier received; OSS, which checks "
                   "no digest of client-side encrypted data, stored the object as received")
        log.warning(f"oss: {message}")
        return refusal(400, "InvalidDigest", message, head=True)


class Download(Exchange):
    """GetObject and HeadObject: the object's data key unwrapped by the master key version that wrapped it
    (else by every readable version, newest first, at most 16), the body decrypted as it streams from where
    the provider's answer starts (its Content-Range: any range the provider serves, suffix and open ones
    too), and the headers made those of the plaintext."""

    # OSS compresses some answers for clients that accept gzip; compressed ciphertext cannot be decrypted.
    headers = {"accept-encoding": None}

    def __init__(self, request: Request, operation: Operation, rule: Rule, keys: tuple[Key, ...]):
        self.rule, self.bucket, self.head = rule, operation.bucket, request.method == "HEAD"
        matdesc = dict(rule.matdesc) or None
        self._masters = {key.sha256_b64: replace(key.master, name=f"{key.name} {key.version}", matdesc=matdesc)
                         for key in keys[:envelope.MAX_MASTER_KEYS]}

    def respond(self, status: int, headers: list[tuple[str, str]]) -> Reply:
        if status not in (200, 206):
            return Reply(status, headers)  # the provider's own answer: an error, 304, 416
        fields = {name.lower(): value for name, value in headers}
        wrapped_by = self._masters.get(fields.get(MASTER_KEY_HEADER, ""))
        try:
            material = envelope.parse_metadata(fields, [wrapped_by] if wrapped_by else list(self._masters.values()))
        except envelope.MissingEnvelope:
            if self.rule.plaintext_reads == "allow":
                return Reply(status, headers)
            return self._refused(f"the object has no client-side encryption metadata (it is stored in plaintext) and "
                                 f"{self.rule.name} has plaintext_reads: deny; set plaintext_reads: allow on it to "
                                 "read objects written before the bucket was encrypted", fields)
        except envelope.EnvelopeError as exc:
            return self._refused(f"keycourier cannot decrypt the object: {exc}", fields)
        start = _CONTENT_RANGE.fullmatch(fields.get("content-range", "")) if status == 206 else None
        if status == 206 and not start:
            return self._refused("the provider answered a range keycourier cannot place in the object", fields, 502)
        md5 = fields.get(envelope.UNENCRYPTED_MD5_HEADER) if status == 200 else None  # a range's is not the object's
        plain = [(name, value) for name, value in _without(headers, CRC_HEADER, "content-md5")
                 if not name.lower().startswith(OWN_METADATA)]
        return Reply(status, plain + ([("Content-MD5", md5)] if md5 else []),
                     material.cipher(int(start[1]) if start else 0))

    def _refused(self, message: str, fields: dict[str, str], status: int = 403) -> Reply:
        """Every failure to unwrap answers alike (status, body, and, the engine unwrapping both parts, time)."""
        log.warning(f"oss bucket {self.bucket}: {self.rule.name}: {message}")
        code = "AccessDenied" if status == 403 else "InvalidResponse"
        return refusal(status, code, message, head=self.head or fields.get("content-length") == "0")


def refusal(status: int, code: str, message: str, *, head: bool) -> Reply:
    """keycourier's own error answer in place of the provider's, in OSS's form: the error document as the body,
    or, where the answer has no body (HEAD, an empty object), base64 in x-oss-err, which oss2 reads."""
    content_type, document = xml_error_body(code, f"keycourier: {message}")
    headers = [("Content-Type", content_type)]
    if head:
        return Reply(status, [*headers, ("Content-Length", "0"), ("x-oss-err", base64.b64encode(document).decode())],
                     _once(b""), message)
    return Reply(status, [*headers, ("Content-Length", str(len(document)))], _once(document), message)


def _once(document: bytes) -> Callable[[bytes], bytes]:
    """A body transform that answers `document` and drops the provider's body."""
    pending = [document]

    def answer(chunk: bytes) -> bytes:
        return pending.pop() if pending else b""

    return answer


def _without(headers: list[tuple[str, str]], *names: str) -> list[tuple[str, str]]:
    return [(name, value) for name, value in headers if name.lower() not in names]


def _md5_digest(text: str) -> bytes:
    try:
        digest = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != 16:
        raise Refused(400, "InvalidDigest", "the Content-MD5 you specified is not base64 of an MD5 digest",
                      "unencryptable")
    return digest
