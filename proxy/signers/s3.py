"""AWS Signature Version 4 for S3: check what the client signed, and sign again once keycourier
has added its headers (S3 refuses unsigned x-amz-* headers).

Each step is a function named after the step in AWS's documentation, over the plain `Request`
of proxy.message; docs/sigv4.md lists the rules relied on and where AWS states them. Header auth
(Authorization header) and query auth (presigned URL) share every step: they differ only in where
the signature travels and in X-Amz-Signature being left out of the canonical query.

aws-chunked bodies carry a chain of signatures seeded by the request's signature, so re-signing
the request means re-signing every chunk: `body_resigner` returns the stream callable doing it.

Legacy clients sign with Signature Version 2 (HMAC-SHA1 over AWS's StringToSign, in an
`Authorization: AWS` header or a presigned URL). Those signatures are checked the same way, and the
request goes on signed with SigV4 header auth, which S3 requires of new buckets.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal
from urllib.parse import unquote_to_bytes

from keycourier.message import Request
from keycourier.signers.common import (SignatureError, auth_query_parameters, check_presigned_window,
                                  form_decode, parse_http_date, query_pairs, require_parameters,
                                  seconds, uri_encode, with_authorization)

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

SIGV2_SCHEME = "AWS"
V2_QUERY_AUTH_PARAMETERS = ("AWSAccessKeyId", "Signature", "Expires")
# The sub-resources a SigV2 signature covers: AWS's documented list, response-* overrides and delete,
# plus those S3 added later, as botocore's HmacV1Auth lists them (a client signing fewer fails at S3).
V2_SUBRESOURCES = frozenset({
    "accelerate", "acl", "analytics", "cors", "defaultObjectAcl", "delete", "inventory", "lifecycle",
    "location", "logging", "metrics", "notification", "object-lock", "partNumber", "policy",
    "replication", "requestPayment", "response-cache-control", "response-content-disposition",
    "response-content-encoding", "response-content-language", "response-content-type",
    "response-expires", "restore", "select", "select-type", "storageClass", "tagging", "torrent",
    "uploadId", "uploads", "versionId", "versioning", "versions", "website",
})
# S3 sub-resources outside that list: no SigV2 signature covers them, and keycourier's SigV4 signature
# would, so a SigV2 request naming one is refused rather than granted it (policy, docs/sigv4.md).
V2_UNSIGNED_SUBRESOURCES = frozenset({
    "abac", "annotation", "attributes", "encryption", "intelligent-tiering", "legal-hold",
    "metadataAnnotationTable", "metadataConfiguration", "metadataInventoryTable",
    "metadataJournalTable", "metadataTable", "ownershipControls", "policyStatus",
    "publicAccessBlock", "renameObject", "retention", "session",
})

_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_PAYLOAD_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_TIMESTAMP = re.compile(r"\d{8}T\d{6}Z")
_V2_AUTHORIZATION = re.compile(r"AWS ([^\s:]+):(\S+)")
_V2_SIGNATURE = re.compile(r"[A-Za-z0-9+/]{27}=")  # base64 of a 20-byte HMAC-SHA1
# <bucket>.s3.amazonaws.com, .s3.<region>., .s3-<region>., .s3.dualstack.<region>., .s3-accelerate.
_AWS_VIRTUAL_HOST = re.compile(r"(?P<bucket>.+)\.s3(?:[.-][a-z0-9-]+)*\.amazonaws\.com(?:\.cn)?(?::\d+)?")
_CHUNK_SIZE = re.compile(rb"[0-9a-fA-F]{1,16}")
_CHUNK_SIGNATURE_KEY = b"chunk-signature="
_TRAILER_SIGNATURE_NAME = b"x-amz-trailer-signature"
_MAX_LINE = 1024
_MAX_TRAILER = 16 * 1024


@dataclass(frozen=True)
class SigV4Signature:
    """What the client signed (or, for a SigV2 request, what keycourier signs it with)."""

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


@dataclass(frozen=True)
class SigV2Signature:
    """What a legacy client signed with Signature Version 2."""

    style: Literal["v2-header", "v2-query"]
    access_key_id: str
    signature: str  # base64 HMAC-SHA1
    expires: int | None  # v2-query: Expires, epoch seconds
    date: str | None  # v2-header: the x-amz-date header, else the Date header, as sent


# --- Reading the client's signature -------------------------------------------------------------

def read_signature(request: Request) -> SigV4Signature | SigV2Signature | None:
    """The SigV4 or SigV2 authentication the request carries; None if it carries none (anonymous)."""
    authorizations = [value for name, value in request.headers if name.lower() == "authorization"]
    query_names = {name for name, _ in request.query}
    in_query = not query_names.isdisjoint(QUERY_AUTH_PARAMETERS)
    in_v2_query = not query_names.isdisjoint(("AWSAccessKeyId", "Signature"))
    if bool(authorizations) + in_query + in_v2_query > 1:
        raise SignatureError("only one auth mechanism allowed")
    if len(authorizations) > 1:
        raise SignatureError("more than one Authorization header")
    if authorizations:
        if authorizations[0].strip().partition(" ")[0] == SIGV2_SCHEME:
            return _read_v2_authorization_header(request, authorizations[0])
        return _read_authorization_header(request, authorizations[0])
    if in_query:
        return _read_query_parameters(request)
    if in_v2_query:
        return _read_v2_query_parameters(request)
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
    params = auth_query_parameters(request, QUERY_AUTH_PARAMETERS)
    if "X-Amz-Algorithm" in params:
        _check_algorithm(params["X-Amz-Algorithm"])
    require_parameters(params, QUERY_AUTH_PARAMETERS)
    # Presigned URLs normally sign no payload; botocore's S3SigV4QueryAuth honours a declared one.
    payload_hash = (request.query_value("X-Amz-Content-Sha256")
                    or request.header("x-amz-content-sha256") or UNSIGNED_PAYLOAD)
    return _parsed_signature(
        "query", credential=params["X-Amz-Credential"], amz_date=params["X-Amz-Date"],
        signed_headers=params["X-Amz-SignedHeaders"], signature_hex=params["X-Amz-Signature"],
        payload_hash=payload_hash, expires=seconds(params["X-Amz-Expires"], "X-Amz-Expires"),
    )


def _read_v2_authorization_header(request: Request, value: str) -> SigV2Signature:
    match = _V2_AUTHORIZATION.fullmatch(value.strip())
    if not match:
        raise SignatureError("malformed Authorization header")
    # x-amz-date stands in for Date when present (clients that cannot set Date).
    date = request.header("x-amz-date")
    if date is None:
        date = request.header("date")
    if date is None:
        raise SignatureError("missing x-amz-date or Date header")
    parse_http_date(date)
    return SigV2Signature("v2-header", match[1], _v2_signature_value(match[2]), expires=None, date=date)


def _read_v2_query_parameters(request: Request) -> SigV2Signature:
    params = auth_query_parameters(request, V2_QUERY_AUTH_PARAMETERS)
    require_parameters(params, V2_QUERY_AUTH_PARAMETERS)
    if not params["AWSAccessKeyId"]:
        raise SignatureError("malformed AWSAccessKeyId")
    return SigV2Signature("v2-query", params["AWSAccessKeyId"], _v2_signature_value(params["Signature"]),
                          expires=seconds(params["Expires"], "Expires"), date=None)


def _v2_signature_value(value: str) -> str:
    if not _V2_SIGNATURE.fullmatch(value):
        raise SignatureError("malformed signature")
    return value


def _check_algorithm(algorithm: str) -> None:
    if algorithm == ALGORITHM:
        return
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
    return parse_http_date(date).strftime(SIGV4_TIMESTAMP)


def _parse_timestamp(amz_date: str) -> datetime:
    if not _TIMESTAMP.fullmatch(amz_date):
        raise SignatureError("malformed request date")
    try:
        return datetime.fromisoformat(amz_date)  # ISO 8601 basic format, UTC: 20130524T000000Z
    except ValueError:
        raise SignatureError("malformed request date") from None


# --- Verifying and re-signing -------------------------------------------------------------------

def verify(request: Request, signature: SigV4Signature | SigV2Signature, secret_access_key: str,
           now: datetime) -> None:
    """Raise SignatureError unless `signature` is the client's valid signature of `request` at `now`
    (a timezone-aware datetime)."""
    if isinstance(signature, SigV2Signature):
        _check_v2_time(signature, now)
        _check_v2_subresources(request)
        expected = v2_signature(secret_access_key, v2_string_to_sign(request, signature))
    else:
        _check_time(signature, now)
        _check_signed_header_set(request, signature)
        expected = _request_signature(request, signature, secret_access_key, signature.signed_headers)
    if not hmac.compare_digest(expected, signature.signature):
        raise SignatureError("signature does not match")


def resign(request: Request, signature: SigV4Signature | SigV2Signature, secret_access_key: str, *,
           added_headers: Iterable[str], region: str = "us-east-1",
           now: datetime | None = None) -> tuple[Request, str]:
    """`request` signed again, now also over `added_headers`; returns it with the new (seed) signature.
    Signed headers keycourier has removed (a translated dialect's key headers) are left out.

    SigV4: with the client's key id, date, scope and payload hash (`region` and `now` are not used).
    SigV2: with SigV4 header auth for `region` at `now` (timezone-aware; default: the current time),
    in place of the client's SigV2 authentication.
    """
    if isinstance(signature, SigV2Signature):
        request, signature = _as_sigv4_header_auth(request, signature, region,
                                                   now or datetime.now(timezone.utc))
    present = {name.lower() for name, _ in request.headers} | {"host"}  # host: HTTP/2 :authority
    names = tuple(sorted((set(signature.signed_headers) & present) | {name.lower() for name in added_headers}))
    if signature.style == "header":
        new_signature = _request_signature(request, signature, secret_access_key, names)
        value = (f"{ALGORITHM} Credential={signature.access_key_id}/{credential_scope(signature)}, "
                 f"SignedHeaders={signed_headers(names)}, Signature={new_signature}")
        return with_authorization(request, value), new_signature
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
    check_presigned_window(now, signed_at, auth.expires, parameter="X-Amz-Expires",
                           max_expires=MAX_EXPIRES, max_clock_skew=MAX_CLOCK_SKEW)


def _check_v2_time(auth: SigV2Signature, now: datetime) -> None:
    if auth.style == "v2-query":
        if now.timestamp() > auth.expires:
            raise SignatureError("request has expired")
    elif abs(now - parse_http_date(auth.date)) > MAX_CLOCK_SKEW:
        raise SignatureError("request time too skewed")


def _check_v2_subresources(request: Request) -> None:
    unsigned = sorted({name for name, _ in query_pairs(request.raw_query)} & V2_UNSIGNED_SUBRESOURCES)
    if unsigned:
        raise SignatureError("unsupported: signature version 2 does not sign sub-resources: "
                             + ", ".join(unsigned))


def _as_sigv4_header_auth(request: Request, auth: SigV2Signature, region: str,
                          now: datetime) -> tuple[Request, SigV4Signature]:
    """`request` stripped of its SigV2 authentication and dated `now`, with the SigV4 fields to sign it
    under: host, every x-amz-* header, and Content-Type and Content-MD5 when present (what the SigV2
    signature covered). SigV2 never signed the body, so neither does this: UNSIGNED-PAYLOAD."""
    if auth.style == "v2-query":
        request = _without_query_parameters(request, V2_QUERY_AUTH_PARAMETERS)
    amz_date = now.astimezone(timezone.utc).strftime(SIGV4_TIMESTAMP)
    # Date (or an HTTP-date x-amz-date) dated the SigV2 signature; x-amz-date now dates the SigV4 one.
    request = request.with_header_map({"Authorization": None, "Date": None, "x-amz-date": amz_date,
                                       "x-amz-content-sha256": UNSIGNED_PAYLOAD})
    present = {name.lower() for name, _ in request.headers}
    names = ({"host"} | (present & {"content-type", "content-md5"})
             | {name for name in present if name.startswith("x-amz-")})
    return request, SigV4Signature("header", auth.access_key_id, amz_date, amz_date[:8], region, "s3",
                                   tuple(sorted(names)), signature="", payload_hash=UNSIGNED_PAYLOAD,
                                   expires=None)


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
        if form_decode(raw_name) == name.encode():
            parts[index] = f"{raw_name}={uri_encode(value.encode())}"
            return request.with_target(f"{request.path}?{'&'.join(parts)}")
    raise SignatureError(f"{name} missing from the request target")


def _without_query_parameters(request: Request, names: Iterable[str]) -> Request:
    """`request` without the query parameters `names`, every other byte of the target kept."""
    skip = {name.encode() for name in names}
    kept = "&".join(part for part in request.raw_query.split("&")
                    if form_decode(part.partition("=")[0]) not in skip)
    return request.with_target(f"{request.path}?{kept}" if kept else request.path)


# --- The signing steps --------------------------------------------------------------------------

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
        name = form_decode(raw_name)
        if name not in skip:
            pairs.append((uri_encode(name), uri_encode(form_decode(raw_value))))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def canonical_headers(request: Request, names: Iterable[str]) -> str:
    """'name:value\\n' for each signed header in order: values trimmed, inner spaces collapsed,
    repeated fields joined with ','."""
    lines = []
    for name in names:
        values = request.header_values(name)
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
        key = hmac.digest(key, part.encode(), "sha256")
    return key


def signature(key: bytes, string_to_sign: str) -> str:
    return hmac.digest(key, string_to_sign.encode(), "sha256").hex()


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


# --- The Signature Version 2 signing steps ------------------------------------------------------

def v2_string_to_sign(request: Request, auth: SigV2Signature) -> str:
    """Verb, Content-MD5, Content-Type and Date (presigned: Expires) lines, then
    CanonicalizedAmzHeaders and CanonicalizedResource."""
    if auth.style == "v2-query":
        date = str(auth.expires)
    else:
        # An x-amz-date header replaces Date, and is signed among the x-amz-* headers instead.
        date = "" if request.header("x-amz-date") is not None else auth.date
    lines = [request.method.upper(), request.header("content-md5") or "",
             request.header("content-type") or "", date]
    return "".join(f"{line.strip()}\n" for line in lines) + canonicalized_amz_headers(request) \
        + canonicalized_resource(request)


def canonicalized_amz_headers(request: Request) -> str:
    """'name:value\\n' for every x-amz-* header, names lowercased and sorted, values trimmed, repeats
    joined with ','. x-amz-* query parameters count as headers: SDKs move them into presigned URLs."""
    values: dict[str, list[str]] = {}
    query = ((name, value or "") for name, value in query_pairs(request.raw_query))
    for name, value in (*request.headers, *query):
        if name.lower().startswith("x-amz-"):
            values.setdefault(name.lower(), []).append(value.strip())
    return "".join(f"{name}:{','.join(values[name])}\n" for name in sorted(values))


def canonicalized_resource(request: Request) -> str:
    """The path as sent (not decoded) under '/<bucket>', then the signed sub-resources.

    A virtual-hosted AWS host name carries the bucket, which is put in front of the path. A request
    addressing only a bucket ends in '/', the form SDKs sign for path-style requests too.
    """
    path = request.path or "/"
    bucket = _virtual_hosted_bucket(request)
    if bucket is not None:
        path = f"/{bucket}{path}"
    elif path.count("/") == 1 and path != "/":
        path += "/"
    return path + _signed_subresources(request.raw_query)


def _signed_subresources(raw_query: str) -> str:
    """'?name[=value]&…' for the query's sub-resources, sorted by name, values decoded (not encoded)."""
    pairs = sorted(((name, value) for name, value in query_pairs(raw_query) if name in V2_SUBRESOURCES),
                   key=lambda pair: pair[0])
    if not pairs:
        return ""
    return "?" + "&".join(name if value is None else f"{name}={value}" for name, value in pairs)


def _virtual_hosted_bucket(request: Request) -> str | None:
    match = _AWS_VIRTUAL_HOST.fullmatch((request.header("host") or request.authority).lower())
    return match["bucket"] if match else None


def v2_signature(secret_access_key: str, string_to_sign: str) -> str:
    """Base64(HMAC-SHA1(secret, UTF-8 string to sign))."""
    digest = hmac.new(secret_access_key.encode(), string_to_sign.encode("utf-8", "surrogateescape"),
                      hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


# --- aws-chunked bodies -------------------------------------------------------------------------

def body_resigner(signature: SigV4Signature | SigV2Signature, secret_access_key: str,
                  new_seed_signature: str) -> Callable[[bytes], bytes] | None:
    """The stream callable re-signing the body's chunks, or None when its bytes need no change."""
    if isinstance(signature, SigV2Signature):
        return None  # SigV2 signs no chunks, and the SigV4 request goes UNSIGNED-PAYLOAD
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


# Signature styles that sign no header keycourier adds (none here: every style covers them all).
HEADERLESS_STYLES: frozenset[str] = frozenset()
