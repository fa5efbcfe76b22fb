"""AWS Signature Version 4 for S3: check what the client signed, and sign again once keycourier
has added its headers (S3 refuses unsigned x-amz-* headers).

Each step is a function named after the step in AWS's documentation, over the plain `Request`
of proxy.message; docs/sigv4.md lists the rules relied on and where AWS states them. Header auth
(Authorization header) and query auth (presigned URL) share every step: they differ only in where
the signature travels and in X-Amz-Signature being left out of the canonical query.

aws-chunked bodies carry a chain of signatures seeded by the request's signature, so re-signing
the request means re-signing every chunk: `body_resigner` returns the stream callable doing it.
"""
from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Literal
from urllib.parse import quote_from_bytes, unquote_to_bytes

from proxy.message import Request

ALGORITHM = "AWS4-HMAC-SHA256"
SIGV4A_ALGORITHM = "AWS4-ECDSA-P256-SHA256"
CHUNK_ALGORITHM = "AWS4-HMAC-SHA256-PAYLOAD"
TRAILER_ALGORITHM = "AWS4-HMAC-SHA256-TRAILER"
SCOPE_TERMINATOR = "aws4_request"
SIGV4_TIMESTAMP = "%Y%m%dT%H%M%SZ"

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_PAYLOAD = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_PAYLOAD_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_PAYLOAD_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
STREAMING_ECDSA_PAYLOAD = "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD"
STREAMING_ECDSA_PAYLOAD_TRAILER = "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD-TRAILER"
PAYLOAD_TOKENS = frozenset({
    UNSIGNED_PAYLOAD, STREAMING_PAYLOAD, STREAMING_PAYLOAD_TRAILER,
    STREAMING_UNSIGNED_PAYLOAD_TRAILER, STREAMING_ECDSA_PAYLOAD, STREAMING_ECDSA_PAYLOAD_TRAILER,
})
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

MAX_CLOCK_SKEW = timedelta(minutes=15)
MAX_EXPIRES = 7 * 24 * 3600
MAX_CHUNK_SIZE = 16 * 1024 * 1024
# The payload hash is itself part of the canonical request, so S3 does not require its header signed.
UNSIGNED_AMZ_HEADERS_ALLOWED = frozenset({"x-amz-content-sha256"})
QUERY_AUTH_PARAMETERS = (
    "X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date",
    "X-Amz-Expires", "X-Amz-SignedHeaders", "X-Amz-Signature",
)

_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_PAYLOAD_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_TIMESTAMP = re.compile(r"\d{8}T\d{6}Z")
_CHUNK_SIZE = re.compile(rb"[0-9a-fA-F]{1,16}")
_CHUNK_SIGNATURE_KEY = b"chunk-signature="
_TRAILER_SIGNATURE_NAME = b"x-amz-trailer-signature"
_MAX_LINE = 1024
_MAX_TRAILER = 16 * 1024


class SignatureError(Exception):
    """Raised with a reason safe to show the client (no secrets), e.g. 'signature does not match',
    'request has expired'."""


@dataclass(frozen=True)
class SigV4Signature:
    """What the client signed."""

    style: Literal["header", "query"]
    access_key_id: str
    amz_date: str  # 20130524T000000Z
    date: str  # credential scope: date, region, service
    region: str
    service: str
    signed_headers: tuple[str, ...]  # lowercase, as listed by the client
    signature: str
    payload_hash: str  # hex sha256, UNSIGNED-PAYLOAD or a STREAMING-* token
    expires: int | None  # X-Amz-Expires, query style only


# --- Reading the client's signature -------------------------------------------------------------

def read_signature(request: Request) -> SigV4Signature | None:
    """The SigV4 authentication the request carries; None if it carries none (anonymous)."""
    authorizations = [value for name, value in request.headers if name.lower() == "authorization"]
    query_names = {name for name, _ in request.query}
    in_query = not query_names.isdisjoint(QUERY_AUTH_PARAMETERS)
    if authorizations and in_query:
        raise SignatureError("only one auth mechanism allowed")
    if len(authorizations) > 1:
        raise SignatureError("more than one Authorization header")
    if authorizations:
        return _read_authorization_header(request, authorizations[0])
    if in_query:
        return _read_query_parameters(request)
    if {"AWSAccessKeyId", "Signature"} <= query_names:
        raise SignatureError("unsupported: signature version 2")
    return None


def _read_authorization_header(request: Request, value: str) -> SigV4Signature:
    scheme, _, fields = value.strip().partition(" ")
    _check_algorithm(scheme)
    params: dict[str, str] = {}
    for item in fields.split(","):
        name, sep, field_value = item.strip().partition("=")
        if not sep or name in params:
            raise SignatureError("malformed Authorization header")
        params[name] = field_value
    if params.keys() != {"Credential", "SignedHeaders", "Signature"}:
        raise SignatureError("Authorization header needs exactly Credential, SignedHeaders and Signature")
    payload_hash = request.header("x-amz-content-sha256")
    if payload_hash is None:
        raise SignatureError("missing x-amz-content-sha256 header")
    return _parsed_signature(
        "header", credential=params["Credential"], amz_date=_header_timestamp(request),
        signed_headers=params["SignedHeaders"], signature_hex=params["Signature"],
        payload_hash=payload_hash, expires=None,
    )


def _read_query_parameters(request: Request) -> SigV4Signature:
    params: dict[str, str] = {}
    for name, value in request.query:
        if name in QUERY_AUTH_PARAMETERS:
            if name in params:
                raise SignatureError(f"{name} given more than once")
            params[name] = value
    if "X-Amz-Algorithm" in params:
        _check_algorithm(params["X-Amz-Algorithm"])
    missing = [name for name in QUERY_AUTH_PARAMETERS if name not in params]
    if missing:
        raise SignatureError("missing query parameters: " + ", ".join(missing))
    if not params["X-Amz-Expires"].isdigit():
        raise SignatureError("malformed X-Amz-Expires")
    # Presigned URLs normally sign no payload; botocore's S3SigV4QueryAuth honours a declared one.
    payload_hash = (request.query_value("X-Amz-Content-Sha256")
                    or request.header("x-amz-content-sha256") or UNSIGNED_PAYLOAD)
    return _parsed_signature(
        "query", credential=params["X-Amz-Credential"], amz_date=params["X-Amz-Date"],
        signed_headers=params["X-Amz-SignedHeaders"], signature_hex=params["X-Amz-Signature"],
        payload_hash=payload_hash, expires=int(params["X-Amz-Expires"]),
    )


def _check_algorithm(algorithm: str) -> None:
    if algorithm == ALGORITHM:
        return
    if algorithm == "AWS":
        raise SignatureError("unsupported: signature version 2")
    if algorithm == SIGV4A_ALGORITHM:
        raise SignatureError("unsupported: signature version 4A")
    raise SignatureError("unsupported signing algorithm")


def _parsed_signature(style: Literal["header", "query"], *, credential: str, amz_date: str,
                      signed_headers: str, signature_hex: str, payload_hash: str,
                      expires: int | None) -> SigV4Signature:
    """The SigV4Signature from the client's fields, each checked for form."""
    parts = credential.split("/")
    if (len(parts) != 5 or parts[4] != SCOPE_TERMINATOR or not all(parts)
            or not re.fullmatch(r"\d{8}", parts[1])):
        raise SignatureError("malformed credential")
    _parse_timestamp(amz_date)
    names = tuple(signed_headers.split(";"))
    if not all(name and name == name.strip().lower() for name in names):
        raise SignatureError("malformed SignedHeaders")
    if not _SIGNATURE.fullmatch(signature_hex):
        raise SignatureError("malformed signature")
    if payload_hash not in PAYLOAD_TOKENS and not _PAYLOAD_SHA256.fullmatch(payload_hash):
        raise SignatureError("malformed x-amz-content-sha256")
    access_key_id, date, region, service = parts[:4]
    return SigV4Signature(style, access_key_id, amz_date, date, region, service, names,
                          signature_hex, payload_hash, expires)


def _header_timestamp(request: Request) -> str:
    """The request time: x-amz-date, else the Date header (checked in that order, like AWS)."""
    amz_date = request.header("x-amz-date")
    if amz_date is not None:
        return amz_date
    date = request.header("date")
    if date is None:
        raise SignatureError("missing x-amz-date or Date header")
    try:
        parsed = parsedate_to_datetime(date)
    except (TypeError, ValueError):
        raise SignatureError("malformed Date header") from None
    if parsed.tzinfo is None:  # RFC 5322 "-0000": UTC with no zone information
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc).strftime(SIGV4_TIMESTAMP)


def _parse_timestamp(amz_date: str) -> datetime:
    if not _TIMESTAMP.fullmatch(amz_date):
        raise SignatureError("malformed request date")
    try:
        return datetime.strptime(amz_date, SIGV4_TIMESTAMP).replace(tzinfo=timezone.utc)
    except ValueError:
        raise SignatureError("malformed request date") from None


# --- Verifying and re-signing -------------------------------------------------------------------

def verify(request: Request, signature: SigV4Signature, secret_access_key: str, now: datetime) -> None:
    """Raise SignatureError unless `signature` is the client's valid signature of `request` at `now`
    (a timezone-aware datetime)."""
    _check_time(signature, now)
    _check_signed_header_set(request, signature)
    expected = _request_signature(request, signature, secret_access_key, signature.signed_headers)
    if not hmac.compare_digest(expected, signature.signature):
        raise SignatureError("signature does not match")


def resign(request: Request, signature: SigV4Signature, secret_access_key: str, *,
           added_headers: Iterable[str]) -> tuple[Request, str]:
    """`request` signed again with the client's key id, date, scope and payload hash, now also over
    `added_headers`; returns it with the new (seed) signature."""
    names = tuple(sorted(set(signature.signed_headers) | {name.lower() for name in added_headers}))
    if signature.style == "header":
        new_signature = _request_signature(request, signature, secret_access_key, names)
        value = (f"{ALGORITHM} Credential={signature.access_key_id}/{credential_scope(signature)}, "
                 f"SignedHeaders={signed_headers(names)}, Signature={new_signature}")
        header_name = next(
            (name for name, _ in request.headers if name.lower() == "authorization"), "Authorization")
        return request.with_header_map({header_name: value}), new_signature
    # X-Amz-SignedHeaders is itself in the canonical query, so it changes before signing.
    request = _with_query_value(request, "X-Amz-SignedHeaders", signed_headers(names))
    new_signature = _request_signature(request, signature, secret_access_key, names)
    return _with_query_value(request, "X-Amz-Signature", new_signature), new_signature


def _check_time(auth: SigV4Signature, now: datetime) -> None:
    signed_at = _parse_timestamp(auth.amz_date)
    if auth.date != auth.amz_date[:8]:
        raise SignatureError("credential date does not match request date")
    if auth.style == "header":
        if abs(now - signed_at) > MAX_CLOCK_SKEW:
            raise SignatureError("request time too skewed")
        return
    if auth.expires is None or not 1 <= auth.expires <= MAX_EXPIRES:
        raise SignatureError(f"X-Amz-Expires must be between 1 and {MAX_EXPIRES} seconds")
    if signed_at - now > MAX_CLOCK_SKEW:
        raise SignatureError("request is not yet valid")
    if now > signed_at + timedelta(seconds=auth.expires):
        raise SignatureError("request has expired")


def _check_signed_header_set(request: Request, auth: SigV4Signature) -> None:
    signed = set(auth.signed_headers)
    if "host" not in signed:
        raise SignatureError("host header must be signed")
    unsigned = sorted({
        name.lower() for name, _ in request.headers
        if name.lower().startswith("x-amz-") and name.lower() not in signed
    } - UNSIGNED_AMZ_HEADERS_ALLOWED)
    if unsigned:
        raise SignatureError("headers present in the request were not signed: " + ", ".join(unsigned))


def _request_signature(request: Request, auth: SigV4Signature, secret_access_key: str,
                       names: Iterable[str]) -> str:
    excluded = ("X-Amz-Signature",) if auth.style == "query" else ()
    request_digest = canonical_request(request, names, auth.payload_hash, excluded_query=excluded)
    key = signing_key(secret_access_key, auth.date, auth.region, auth.service)
    return signature(key, string_to_sign(auth.amz_date, credential_scope(auth), request_digest))


def _with_query_value(request: Request, name: str, value: str) -> Request:
    """`request` with query parameter `name` set to `value`, every other byte of the target kept."""
    parts = request.raw_query.split("&")
    for index, part in enumerate(parts):
        raw_name = part.partition("=")[0]
        if _form_decode(raw_name) == name.encode():
            parts[index] = f"{raw_name}={uri_encode(value.encode())}"
            return request.with_target(f"{request.path}?{'&'.join(parts)}")
    raise SignatureError(f"{name} missing from the request target")


# --- The signing steps --------------------------------------------------------------------------

def uri_encode(data: bytes) -> str:
    """AWS UriEncode: every byte but the unreserved A-Za-z0-9-_.~ as %XY (uppercase hex)."""
    return quote_from_bytes(data, safe=b"")


def canonical_uri(path: str) -> str:
    """The path, not normalised (S3), each segment decoded and UriEncoded once.

    For the strictly encoded paths SDKs send this is the path as sent; a path holding reserved
    characters raw (e.g. '=') gets them encoded, as S3 does when it checks the signature.
    """
    if not path:
        return "/"
    return "/".join(uri_encode(unquote_to_bytes(segment)) for segment in path.split("/"))


def canonical_query_string(raw_query: str, *, excluded: Iterable[str] = ()) -> str:
    """Parameters decoded then UriEncoded, sorted by name then value, joined with '&'."""
    skip = {name.encode() for name in excluded}
    pairs = []
    for part in raw_query.split("&"):
        if not part:
            continue
        raw_name, _, raw_value = part.partition("=")
        name = _form_decode(raw_name)
        if name not in skip:
            pairs.append((uri_encode(name), uri_encode(_form_decode(raw_value))))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def _form_decode(text: str) -> bytes:
    # '+' in a query means space: S3 accepts a space sent as '+' but signed as %20.
    return unquote_to_bytes(text.replace("+", " "))


def canonical_headers(request: Request, names: Iterable[str]) -> str:
    """'name:value\\n' for each signed header in order: values trimmed, inner spaces collapsed,
    repeated fields joined with ','."""
    lines = []
    for name in names:
        values = [value for field, value in request.headers if field.lower() == name]
        if not values:
            if name != "host":
                raise SignatureError(f"signed header missing from the request: {name}")
            values = [request.authority]  # HTTP/2 carries the host as :authority
        lines.append(f"{name}:{','.join(' '.join(value.split()) for value in values)}\n")
    return "".join(lines)


def signed_headers(names: Iterable[str]) -> str:
    return ";".join(names)


def canonical_request(request: Request, names: Iterable[str], payload_hash: str, *,
                      excluded_query: Iterable[str] = ()) -> str:
    names = sorted(set(names))
    return "\n".join([
        request.method.upper(),
        canonical_uri(request.path),
        canonical_query_string(request.raw_query, excluded=excluded_query),
        canonical_headers(request, names),
        signed_headers(names),
        payload_hash,
    ])


def credential_scope(auth: SigV4Signature) -> str:
    return f"{auth.date}/{auth.region}/{auth.service}/{SCOPE_TERMINATOR}"


def string_to_sign(amz_date: str, scope: str, canonical_request: str) -> str:
    return "\n".join([ALGORITHM, amz_date, scope, _sha256_hex(canonical_request.encode())])


def signing_key(secret_access_key: str, date: str, region: str, service: str) -> bytes:
    key = f"AWS4{secret_access_key}".encode()
    for part in (date, region, service, SCOPE_TERMINATOR):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def signature(key: bytes, string_to_sign: str) -> str:
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def chunk_string_to_sign(amz_date: str, scope: str, previous_signature: str, chunk_sha256: str) -> str:
    return "\n".join([CHUNK_ALGORITHM, amz_date, scope, previous_signature, EMPTY_SHA256, chunk_sha256])


def canonical_trailer(lines: Iterable[bytes]) -> bytes:
    """'name:value\\n' for each trailing header line ('name:value'), in the order sent."""
    canonical = bytearray()
    for line in lines:
        name, _, value = line.partition(b":")
        canonical += name.strip().lower() + b":" + value.strip() + b"\n"
    return bytes(canonical)


def trailer_string_to_sign(amz_date: str, scope: str, previous_signature: str,
                           trailer_sha256: str) -> str:
    return "\n".join([TRAILER_ALGORITHM, amz_date, scope, previous_signature, trailer_sha256])


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- aws-chunked bodies -------------------------------------------------------------------------

def body_resigner(signature: SigV4Signature, secret_access_key: str,
                  new_seed_signature: str) -> Callable[[bytes], bytes] | None:
    """The stream callable re-signing the body's chunks, or None when its bytes need no change."""
    if signature.payload_hash in (STREAMING_PAYLOAD, STREAMING_PAYLOAD_TRAILER):
        return AwsChunkedResigner(secret_access_key=secret_access_key, signature=signature,
                                  new_seed_signature=new_seed_signature)
    if signature.payload_hash in (STREAMING_ECDSA_PAYLOAD, STREAMING_ECDSA_PAYLOAD_TRAILER):
        raise SignatureError("unsupported: signature version 4A chunk signatures")
    return None


class AwsChunkedResigner:
    """A stream callable for aws-chunked request bodies (mitmproxy semantics: called with each piece
    of body data as it arrives, and once with b"" at the end; returns the bytes to forward).

    Verifies each chunk against the client's signature chain and forwards it signed on the chain
    seeded by `new_seed_signature`. A chunk header can only be written once the chunk's data is
    hashed, so at most one chunk (<= MAX_CHUNK_SIZE) is held. The output has the input's length.
    """

    def __init__(self, *, secret_access_key: str, signature: SigV4Signature, new_seed_signature: str):
        self._key = signing_key(secret_access_key, signature.date, signature.region, signature.service)
        self._amz_date = signature.amz_date
        self._scope = credential_scope(signature)
        self._with_trailer = signature.payload_hash == STREAMING_PAYLOAD_TRAILER
        self._client_previous = signature.signature
        self._new_previous = new_seed_signature
        self._buffer = bytearray()
        self._read = self._read_chunk_header
        self._chunk_size = 0
        self._chunk_size_field = b""
        self._chunk_signature = ""
        self._trailer_lines: list[bytes] = []
        self._trailer_signature_line = b""
        self._trailer_bytes = 0
        self._ended = False

    def __call__(self, data: bytes) -> bytes:
        self._buffer += data
        out = bytearray()
        while not self._ended and self._read(out):
            pass
        if self._ended and self._buffer:
            raise SignatureError("data after the end of the aws-chunked body")
        if not data and not self._ended:
            raise SignatureError("aws-chunked body ended early")
        return bytes(out)

    def _line(self) -> bytes | None:
        """The next CRLF-terminated line, consumed; None until it has fully arrived."""
        end = self._buffer.find(b"\r\n", 0, _MAX_LINE + 2)
        if end < 0:
            if len(self._buffer) >= _MAX_LINE + 2:
                raise SignatureError("malformed aws-chunked body: line too long")
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 2]
        return line

    def _read_chunk_header(self, out: bytearray) -> bool:
        line = self._line()
        if line is None:
            return False
        size_field, _, extension = line.partition(b";")
        if not (_CHUNK_SIZE.fullmatch(size_field) and extension.startswith(_CHUNK_SIGNATURE_KEY)):
            raise SignatureError("malformed aws-chunked chunk header")
        signature_hex = extension[len(_CHUNK_SIGNATURE_KEY):].decode("ascii", "replace")
        if not _SIGNATURE.fullmatch(signature_hex):
            raise SignatureError("malformed aws-chunked chunk signature")
        self._chunk_size = int(size_field, 16)
        if self._chunk_size > MAX_CHUNK_SIZE:
            raise SignatureError(f"aws-chunked chunk larger than {MAX_CHUNK_SIZE} bytes")
        self._chunk_size_field = size_field
        self._chunk_signature = signature_hex
        if self._chunk_size:
            self._read = self._read_chunk_data
            return True
        # The final, empty chunk: its header, then trailing headers up to an empty line.
        self._write_chunk_header(out, EMPTY_SHA256)
        self._read = self._read_trailer_line
        return True

    def _read_chunk_data(self, out: bytearray) -> bool:
        size = self._chunk_size
        if len(self._buffer) < size + 2:
            return False
        if self._buffer[size:size + 2] != b"\r\n":
            raise SignatureError("malformed aws-chunked body: chunk data not followed by CRLF")
        self._write_chunk_header(out, hashlib.sha256(memoryview(self._buffer)[:size]).hexdigest())
        out += memoryview(self._buffer)[:size + 2]
        del self._buffer[:size + 2]
        self._read = self._read_chunk_header
        return True

    def _write_chunk_header(self, out: bytearray, chunk_sha256: str) -> None:
        new_signature = self._next_signature(
            self._chunk_signature, "chunk",
            lambda previous: chunk_string_to_sign(self._amz_date, self._scope, previous, chunk_sha256))
        # The client's size field is kept as sent so the body keeps its length (Content-Length).
        out += self._chunk_size_field + b";" + _CHUNK_SIGNATURE_KEY + new_signature.encode() + b"\r\n"

    def _read_trailer_line(self, out: bytearray) -> bool:
        line = self._line()
        if line is None:
            return False
        if not line:
            self._finish_trailer(out)
            return True
        self._trailer_bytes += len(line)
        name, separator, _ = line.partition(b":")
        if not separator or self._trailer_signature_line or self._trailer_bytes > _MAX_TRAILER:
            raise SignatureError("malformed aws-chunked trailer")
        if name.strip().lower() == _TRAILER_SIGNATURE_NAME:
            self._trailer_signature_line = line
        else:
            self._trailer_lines.append(line)
        return True

    def _finish_trailer(self, out: bytearray) -> None:
        if not self._with_trailer:
            if self._trailer_lines or self._trailer_signature_line:
                raise SignatureError("trailing headers in an aws-chunked body declared without them")
        else:
            if not self._trailer_signature_line:
                raise SignatureError("missing x-amz-trailer-signature")
            client_signature = self._trailer_signature_line.partition(b":")[2].strip().decode(
                "ascii", "replace")
            if not _SIGNATURE.fullmatch(client_signature):
                raise SignatureError("malformed x-amz-trailer-signature")
            trailer_sha256 = _sha256_hex(canonical_trailer(self._trailer_lines))
            new_signature = self._next_signature(
                client_signature, "trailer",
                lambda previous: trailer_string_to_sign(self._amz_date, self._scope, previous,
                                                        trailer_sha256))
            for line in self._trailer_lines:
                out += line + b"\r\n"
            out += self._trailer_signature_line.replace(
                client_signature.encode(), new_signature.encode(), 1) + b"\r\n"
        out += b"\r\n"
        self._ended = True

    def _next_signature(self, client_signature: str, what: str,
                        string_to_sign_after: Callable[[str], str]) -> str:
        """Check the client's next signature in its chain; return ours for the same content."""
        expected = signature(self._key, string_to_sign_after(self._client_previous))
        if not hmac.compare_digest(expected, client_signature):
            raise SignatureError(f"{what} signature does not match")
        self._client_previous = expected
        self._new_previous = signature(self._key, string_to_sign_after(self._new_previous))
        return self._new_previous
