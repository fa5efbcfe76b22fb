"""A strict S3-compatible server for tests (the "test upstream").

It runs in a background thread of the test process and follows AWS's documented
behaviour as closely as it can, so that a proxy bug shows up as a failed request
instead of being papered over. docs/s3.md lists every rule with its source.

Objects are always encrypted at rest with AES-256-GCM: SSE-C objects under the
customer's key, all others under a key owned by the server (S3 encrypts every new
object by default). SigV4 canonical requests, strings to sign and signing keys are
computed by botocore, fed exactly what the client declared it signed.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime as dt
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import threading
import traceback
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from urllib.parse import quote, unquote

import trustme
import yaml
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# ReceivedRequest is re-exported: part of this module's API.
from tests.upstreams.common import (CallParameters, ReceivedRequest, Response, ServiceError,
                                    b64decode_or_none, bucket_and_key, http_date, iso_date, parse_query,
                                    parse_xml, reflected_crc, seal, unseal, utc_now, xml_child_text,
                                    xml_children, xml_element, xml_response)
from tests.upstreams.server import StorageHandler, StorageUpstream

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
_STREAMING_MODES = (STREAMING_UNSIGNED_TRAILER, STREAMING_SIGNED, STREAMING_SIGNED_TRAILER)
_TRAILER_MODES = (STREAMING_UNSIGNED_TRAILER, STREAMING_SIGNED_TRAILER)

_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"
_SIGV4_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
_MAX_CLOCK_SKEW = dt.timedelta(minutes=15)
_MAX_PRESIGNED_EXPIRES = 7 * 24 * 3600
_MIN_PART_SIZE = 5 * 1024 * 1024
_MIN_SIGNED_CHUNK_SIZE = 8 * 1024
_MAX_PART_NUMBER = 10000
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_SSE_C = "x-amz-server-side-encryption-customer-"
_COPY_SOURCE_SSE_C = "x-amz-copy-source-server-side-encryption-customer-"
_SSE_ARGUMENT = "x-amz-server-side-encryption"  # the ArgumentName of every SSE-C argument error
# AWS documents that only the algorithm must be signed in a presigned SSE-C URL.
_PRESIGNED_UNSIGNED_ALLOWED = frozenset({_SSE_C + "key", _SSE_C + "key-md5"})
_OWNER_ID = "75aa57f09aa0c8caeab4f8c24e99d10f8e7faeebf76c078efc7c6caea54ba06a"

# Query parameters that select an S3 operation ("sub-resources"); any combination not
# in _OPERATIONS is an operation this server does not implement.
_SUBRESOURCES = frozenset({
    "accelerate", "acl", "analytics", "attributes", "cors", "delete", "encryption",
    "intelligent-tiering", "inventory", "legal-hold", "lifecycle", "list-type", "location",
    "logging", "metadataTable", "metrics", "notification", "object-lock", "ownershipControls",
    "partNumber", "policy", "policyStatus", "publicAccessBlock", "replication",
    "requestPayment", "restore", "retention", "select", "session", "tagging", "torrent",
    "uploadId", "uploads", "versionId", "versioning", "versions", "website",
})
_STORED_CONTENT_HEADERS = (
    "Cache-Control", "Content-Disposition", "Content-Encoding", "Content-Language",
    "Content-Type", "Expires",
)
_RESPONSE_OVERRIDES = {
    "response-cache-control": "Cache-Control",
    "response-content-disposition": "Content-Disposition",
    "response-content-encoding": "Content-Encoding",
    "response-content-language": "Content-Language",
    "response-content-type": "Content-Type",
    "response-expires": "Expires",
}
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


# --- errors ---------------------------------------------------------------------------

class S3Error(ServiceError):
    """An S3 error response: status, code, message and any extra <Error> elements."""


def _invalid_argument(message: str, argument: str | None = None) -> S3Error:
    return S3Error(400, "InvalidArgument", message, {"ArgumentName": argument} if argument else None)


def _invalid_request(message: str) -> S3Error:
    return S3Error(400, "InvalidRequest", message)


def _access_denied(message: str = "Access Denied", details: dict[str, str] | None = None) -> S3Error:
    return S3Error(403, "AccessDenied", message, details)


def _signature_mismatch(details: dict[str, str] | None = None) -> S3Error:
    return S3Error(403, "SignatureDoesNotMatch",
                   "The request signature we calculated does not match the signature you provided. "
                   "Check your key and signing method.", details)


def _not_implemented(header: str | None = None) -> S3Error:
    return S3Error(501, "NotImplemented", "A header you provided implies functionality that is not "
                   "implemented", {"Header": header} if header else None)


def _incomplete_body() -> S3Error:
    return S3Error(400, "IncompleteBody", "The request body terminated unexpectedly")


def _malformed_trailer() -> S3Error:
    return S3Error(400, "MalformedTrailerError",
                   "The request contained trailing data that was not well-formed or did not "
                   "conform to our published schema.")


def _malformed_xml() -> S3Error:
    return S3Error(400, "MalformedXML",
                   "The XML you provided was not well-formed or did not validate against our "
                   "published schema")


# --- checksums ------------------------------------------------------------------------

CHECKSUMS: dict[str, Callable[[bytes], bytes]] = {
    "crc32": lambda data: zlib.crc32(data).to_bytes(4, "big"),
    "crc32c": reflected_crc(0x82F63B78, 32),
    "crc64nvme": reflected_crc(0x9A6C9329AC4BC9B5, 64),
    "sha1": lambda data: hashlib.sha1(data).digest(),
    "sha256": lambda data: hashlib.sha256(data).digest(),
}
_CHECKSUM_HEADERS = {f"x-amz-checksum-{algorithm}": algorithm for algorithm in CHECKSUMS}
_CHECKSUM_CONTROL_HEADERS = ("x-amz-checksum-algorithm", "x-amz-checksum-mode", "x-amz-checksum-type")
_CHECKSUM_XML = {"crc32": "ChecksumCRC32", "crc32c": "ChecksumCRC32C",
                 "crc64nvme": "ChecksumCRC64NVME", "sha1": "ChecksumSHA1", "sha256": "ChecksumSHA256"}


def _verify_checksum(header: str, claimed: str, data: bytes) -> tuple[str, str]:
    """Check an x-amz-checksum-* value against the data; return (algorithm, base64 value)."""
    algorithm = _CHECKSUM_HEADERS[header]
    expected = CHECKSUMS[algorithm](data)
    claimed_bytes = b64decode_or_none(claimed)
    if claimed_bytes is None or len(claimed_bytes) != len(expected):
        raise _invalid_request(f"Value for {header} header is invalid.")
    if claimed_bytes != expected:
        raise S3Error(400, "BadDigest",
                      f"The {algorithm.upper()} you specified did not match the calculated checksum.")
    return algorithm, claimed


# --- encryption at rest and customer keys ---------------------------------------------

@dataclass(frozen=True)
class CustomerKey:
    key: bytes
    md5: str  # base64 MD5 of the raw key, as S3 echoes it


@dataclass(frozen=True)
class KeyFingerprint:
    """What S3 keeps instead of a customer key: a randomly salted HMAC of it."""

    salt: bytes
    mac: bytes

    @classmethod
    def of(cls, key: bytes) -> KeyFingerprint:
        salt = os.urandom(16)
        return cls(salt, hmac.new(salt, key, "sha256").digest())

    def matches(self, key: bytes) -> bool:
        return hmac.compare_digest(self.mac, hmac.new(self.salt, key, "sha256").digest())


def _customer_key(headers: Message, prefix: str, secure: bool, *, read: bool = False) -> CustomerKey | None:
    """Parse and validate one family of SSE-C headers (object or copy source).

    S3 names `x-amz-server-side-encryption` as the ArgumentName of every SSE-C argument error,
    whichever header was at fault. On a read (`read=True`) a well-formed key of the wrong length
    is not refused here: S3 answers it like any other key that does not open the object.
    """
    algorithm = headers.get(prefix + "algorithm")
    key_text = headers.get(prefix + "key")
    md5_text = headers.get(prefix + "key-MD5")
    if algorithm is None and key_text is None and md5_text is None:
        return None
    if not secure:
        raise _invalid_request("Requests specifying Server Side Encryption with Customer provided "
                               "keys must be made over a secure connection.")
    if algorithm is None:
        raise _invalid_argument("Requests specifying Server Side Encryption with Customer provided "
                                "keys must provide a valid encryption algorithm.", _SSE_ARGUMENT)
    if algorithm != "AES256":
        raise S3Error(400, "InvalidEncryptionAlgorithmError",
                      "The Encryption request you specified is not valid. Supported value: AES256.",
                      {"ArgumentName": _SSE_ARGUMENT, "ArgumentValue": algorithm})
    if key_text is None:
        raise _invalid_argument("Requests specifying Server Side Encryption with Customer provided "
                                "keys must provide an appropriate secret key.", _SSE_ARGUMENT)
    key = b64decode_or_none(key_text)
    if key is None or (len(key) != 32 and not read):
        raise _invalid_argument("The secret key was invalid for the specified algorithm.", _SSE_ARGUMENT)
    if md5_text is None:
        raise _invalid_argument("Requests specifying Server Side Encryption with Customer provided "
                                "keys must provide the client calculated MD5 of the secret key.",
                                _SSE_ARGUMENT)
    md5 = hashlib.md5(key).digest()
    if b64decode_or_none(md5_text) != md5:
        raise _invalid_argument("The calculated MD5 hash of the key did not match the hash that was "
                                "provided.", _SSE_ARGUMENT)
    return CustomerKey(key, base64.b64encode(md5).decode())


def _check_read_key(fingerprint: KeyFingerprint | None, customer_key: CustomerKey | None, *,
                    copy_source: bool = False) -> None:
    """Reading (GET, HEAD, attributes, copy source) needs exactly the key the object was written with."""
    if fingerprint is None:
        if customer_key is not None:
            raise _invalid_request("The encryption parameters are not applicable to this object.")
    elif customer_key is None:
        raise _invalid_request("The object was stored using a form of Server Side Encryption. "
                               "The correct parameters must be provided to retrieve the object.")
    elif not fingerprint.matches(customer_key.key):
        # S3's wording for GET (docs/read-errors.md); a copy source's wrong key is not on record.
        raise _access_denied() if copy_source else _access_denied(
            "Requests specifying Server Side Encryption with Customer provided keys must provide "
            "the correct secret key.")


# --- SigV4 ----------------------------------------------------------------------------

class _ClientListedHeaders:
    """Make a botocore signer canonicalize exactly the headers the client listed.

    botocore picks the headers to sign itself (it skips e.g. user-agent); a server has
    to use the client's SignedHeaders instead, so requests hold only those headers.
    """

    def headers_to_sign(self, request: AWSRequest):
        return request.headers


class _HeaderSigner(_ClientListedHeaders, S3SigV4Auth):
    pass


class _QuerySigner(_ClientListedHeaders, S3SigV4QueryAuth):
    pass


@dataclass(frozen=True)
class SignatureCheck:
    signature: str
    canonical_request: str
    string_to_sign: str


def sigv4_signature(method: str, raw_path: str, query: list[tuple[str, str]],
                    signed_headers: list[tuple[str, str]], *, secret_key: str, region: str,
                    timestamp: str, presigned: bool = False) -> SignatureCheck:
    """The signature S3 expects for a request, computed by botocore's S3 signers.

    `query` holds decoded parameters (without X-Amz-Signature) and `signed_headers` the
    headers named in SignedHeaders, as received.
    """
    canonical_path = quote(unquote(raw_path), safe="/~")
    request = AWSRequest(method=method, url=f"https://s3{canonical_path}", params=query)
    for name, value in signed_headers:
        request.headers[name] = value
    request.context["timestamp"] = timestamp
    signer_class = _QuerySigner if presigned else _HeaderSigner
    signer = signer_class(Credentials("", secret_key), "s3", region)
    canonical_request = signer.canonical_request(request)
    string_to_sign = signer.string_to_sign(request, canonical_request)
    return SignatureCheck(signer.signature(string_to_sign, request), canonical_request, string_to_sign)


class ChunkSigner:
    """Signatures of aws-chunked chunks and trailers, chained from a seed signature."""

    def __init__(self, *, secret_key: str, region: str, timestamp: str, seed_signature: str):
        self._signer = S3SigV4Auth(Credentials("", secret_key), "s3", region)
        self._request = AWSRequest()
        self._request.context["timestamp"] = timestamp
        self._timestamp = timestamp
        self._scope = self._signer.credential_scope(self._request)
        self.seed_signature = seed_signature

    def _sign(self, algorithm: str, previous: str, *hashes: str) -> str:
        string_to_sign = "\n".join([algorithm, self._timestamp, self._scope, previous, *hashes])
        return self._signer.signature(string_to_sign, self._request)

    def chunk(self, previous: str, data: bytes) -> str:
        return self._sign("AWS4-HMAC-SHA256-PAYLOAD", previous, _EMPTY_SHA256,
                          hashlib.sha256(data).hexdigest())

    def trailer(self, previous: str, canonical_trailer: str) -> str:
        return self._sign("AWS4-HMAC-SHA256-TRAILER", previous,
                          hashlib.sha256(canonical_trailer.encode()).hexdigest())


@dataclass(frozen=True)
class _Principal:
    """An authenticated request: how its payload is to be checked."""

    payload_hash: str
    chunk_signer: ChunkSigner | None


def _credential_scope(credential: str, timestamp: str, region: str,
                      malformed: Callable[..., S3Error]) -> str:
    """Check AKID/date/region/s3/aws4_request against the request; return the access key."""
    parts = credential.split("/")
    if len(parts) != 5:
        raise malformed('the Credential is mal-formed; expecting '
                        '"<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/aws4_request".')
    access_key, date, scope_region, service, terminator = parts
    if date != timestamp[:8]:
        raise malformed("Invalid credential date. Date is not the same as X-Amz-Date.")
    if scope_region != region:
        raise malformed(f"the region '{scope_region}' is wrong; expecting '{region}'", {"Region": region})
    if service != "s3":
        raise malformed(f'incorrect service "{service}". This endpoint belongs to "s3".')
    if terminator != "aws4_request":
        raise malformed(f'incorrect terminal "{terminator}". This endpoint uses "aws4_request".')
    return access_key


def _header_malformed(message: str, details: dict[str, str] | None = None) -> S3Error:
    return S3Error(400, "AuthorizationHeaderMalformed",
                   f"The authorization header is malformed; {message}", details)


def _query_malformed(message: str, details: dict[str, str] | None = None) -> S3Error:
    return S3Error(400, "AuthorizationQueryParametersError",
                   f"Error parsing the X-Amz-Credential parameter; {message}", details)


def _require_signed(headers: Message, signed: list[str], exempt: frozenset[str] = frozenset()) -> None:
    """S3 refuses x-amz-* headers that are not covered by the signature; host must be signed too."""
    unsigned = sorted({name.lower() for name in headers.keys()
                       if name.lower().startswith("x-amz-")} - set(signed) - exempt)
    if "host" not in signed:
        unsigned.insert(0, "host")
    if unsigned:
        raise _access_denied("There were headers present in the request which were not signed",
                             {"HeadersNotSigned": ", ".join(unsigned)})


def _signed_header_values(headers: Message, signed: list[str]) -> list[tuple[str, str]]:
    return [(name, value) for name in signed for value in headers.get_all(name, [])]


def _parse_timestamp(text: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(text or "", _SIGV4_TIME_FORMAT).replace(tzinfo=dt.UTC)
    except ValueError:
        return None


def _check_signature(incoming: _Incoming, signed: list[str], query: list[tuple[str, str]],
                     provided: str, *, access_key: str, secret_key: str, region: str,
                     timestamp: str, presigned: bool) -> None:
    check = sigv4_signature(incoming.method, incoming.raw_path, query,
                            _signed_header_values(incoming.headers, signed), secret_key=secret_key,
                            region=region, timestamp=timestamp, presigned=presigned)
    if not hmac.compare_digest(check.signature, provided):
        raise _signature_mismatch({"AWSAccessKeyId": access_key,
                                   "StringToSign": check.string_to_sign,
                                   "SignatureProvided": provided,
                                   "CanonicalRequest": check.canonical_request})


def _secret_for(access_key: str, credentials: dict[str, str]) -> str:
    secret = credentials.get(access_key)
    if secret is None:
        raise S3Error(403, "InvalidAccessKeyId",
                      "The AWS Access Key Id you provided does not exist in our records.",
                      {"AWSAccessKeyId": access_key})
    return secret


def _authenticate(incoming: _Incoming, credentials: dict[str, str], region: str,
                  now: dt.datetime) -> _Principal:
    query = dict(incoming.query)
    authorization = incoming.headers.get("Authorization")
    if authorization is not None and "X-Amz-Algorithm" in query:
        raise _invalid_argument("Only one auth mechanism allowed; only the X-Amz-Algorithm query "
                                "parameter, Signature query string parameter or the Authorization "
                                "header should be specified", "Authorization")
    if incoming.headers.get("x-amz-security-token") is not None or "X-Amz-Security-Token" in query:
        # Only long-term keys exist here, so no session token can be valid.
        raise S3Error(403, "InvalidToken", "The provided token is malformed or otherwise invalid.")
    if "AWSAccessKeyId" in query:
        raise _invalid_request("Please use AWS4-HMAC-SHA256.")  # a SigV2 presigned URL
    if "X-Amz-Algorithm" in query:
        return _authenticate_presigned(incoming, query, credentials, region, now)
    if authorization is not None:
        return _authenticate_header(incoming, authorization, credentials, region, now)
    raise _access_denied()


def _authenticate_header(incoming: _Incoming, authorization: str, credentials: dict[str, str],
                         region: str, now: dt.datetime) -> _Principal:
    algorithm, _, field_text = authorization.strip().partition(" ")
    if algorithm != "AWS4-HMAC-SHA256":
        raise _invalid_request("Please use AWS4-HMAC-SHA256.")
    fields = dict(part.strip().partition("=")[::2] for part in field_text.split(","))
    if not {"Credential", "SignedHeaders", "Signature"} <= fields.keys():
        raise _header_malformed("the authorization header requires Credential, SignedHeaders "
                                "and Signature.")
    timestamp = incoming.headers.get("x-amz-date")
    request_time = _parse_timestamp(timestamp)
    if request_time is None:
        raise _access_denied("AWS authentication requires a valid Date or x-amz-date header")
    access_key = _credential_scope(fields["Credential"], timestamp, region, _header_malformed)
    secret_key = _secret_for(access_key, credentials)
    signed = fields["SignedHeaders"].split(";")
    _require_signed(incoming.headers, signed)
    if abs(now - request_time) > _MAX_CLOCK_SKEW:
        raise S3Error(403, "RequestTimeTooSkewed",
                      "The difference between the request time and the current time is too large.",
                      {"RequestTime": timestamp, "ServerTime": now.strftime(_SIGV4_TIME_FORMAT),
                       "MaxAllowedSkewMilliseconds": "900000"})
    payload_hash = incoming.headers.get("x-amz-content-sha256")
    if payload_hash is None:
        raise _invalid_request("Missing required header for this request: x-amz-content-sha256")
    if payload_hash not in (UNSIGNED_PAYLOAD, *_STREAMING_MODES) \
            and not re.fullmatch(r"[0-9a-f]{64}", payload_hash):
        raise _invalid_argument(
            "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, STREAMING-UNSIGNED-PAYLOAD-TRAILER, "
            "STREAMING-AWS4-HMAC-SHA256-PAYLOAD, STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER or a "
            "valid sha256 value.", "x-amz-content-sha256")
    signature = fields["Signature"]
    _check_signature(incoming, signed, incoming.query, signature, access_key=access_key,
                     secret_key=secret_key, region=region, timestamp=timestamp, presigned=False)
    chunk_signer = None
    if payload_hash in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER):
        chunk_signer = ChunkSigner(secret_key=secret_key, region=region, timestamp=timestamp,
                                   seed_signature=signature)
    return _Principal(payload_hash, chunk_signer)


def _authenticate_presigned(incoming: _Incoming, query: dict[str, str], credentials: dict[str, str],
                            region: str, now: dt.datetime) -> _Principal:
    def malformed(message: str) -> S3Error:
        return S3Error(400, "AuthorizationQueryParametersError", message)

    required = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Signature", "X-Amz-Date",
                "X-Amz-SignedHeaders", "X-Amz-Expires")
    if not all(name in query for name in required):
        raise malformed("Query-string authentication version 4 requires the X-Amz-Algorithm, "
                        "X-Amz-Credential, X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, and "
                        "X-Amz-Expires parameters.")
    if query["X-Amz-Algorithm"] != "AWS4-HMAC-SHA256":
        raise malformed('X-Amz-Algorithm only supports "AWS4-HMAC-SHA256"')
    timestamp = query["X-Amz-Date"]
    signed_at = _parse_timestamp(timestamp)
    if signed_at is None:
        raise malformed("X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\"")
    if not query["X-Amz-Expires"].isdigit():
        raise malformed("X-Amz-Expires should be a number")
    expires = int(query["X-Amz-Expires"])
    if expires > _MAX_PRESIGNED_EXPIRES:
        raise malformed("X-Amz-Expires must be less than a week (in seconds) that is, the given "
                        f"X-Amz-Expires must be less than {_MAX_PRESIGNED_EXPIRES} seconds")
    access_key = _credential_scope(query["X-Amz-Credential"], timestamp, region, _query_malformed)
    secret_key = _secret_for(access_key, credentials)
    signed = query["X-Amz-SignedHeaders"].split(";")
    _require_signed(incoming.headers, signed, exempt=_PRESIGNED_UNSIGNED_ALLOWED)
    expiry = signed_at + dt.timedelta(seconds=expires)
    if now > expiry:
        raise _access_denied("Request has expired", {
            "X-Amz-Expires": str(expires), "Expires": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "ServerTime": now.strftime("%Y-%m-%dT%H:%M:%SZ")})
    signed_query = [(name, value) for name, value in incoming.query if name != "X-Amz-Signature"]
    _check_signature(incoming, signed, signed_query, query["X-Amz-Signature"], access_key=access_key,
                     secret_key=secret_key, region=region, timestamp=timestamp, presigned=True)
    payload_hash = incoming.headers.get("x-amz-content-sha256") \
        if "x-amz-content-sha256" in signed else UNSIGNED_PAYLOAD
    return _Principal(payload_hash, None)


# --- payloads -------------------------------------------------------------------------

class _Cursor:
    def __init__(self, data: bytes):
        self._data = data
        self._position = 0

    def line(self) -> str:
        end = self._data.find(b"\r\n", self._position)
        if end < 0:
            raise _incomplete_body()
        line = self._data[self._position:end]
        self._position = end + 2
        return line.decode("latin-1")

    def take(self, size: int) -> bytes:
        if self._position + size > len(self._data):
            raise _incomplete_body()
        data = self._data[self._position:self._position + size]
        self._position += size
        return data

    def at_end(self) -> bool:
        return self._position == len(self._data)


def decode_aws_chunked(body: bytes, *, signer: ChunkSigner | None,
                       signed_trailer: bool = False) -> tuple[bytes, dict[str, str]]:
    """Decode an aws-chunked body into (data, trailing headers).

    With a signer every chunk signature is verified along the chain that starts at the
    seed signature, and with `signed_trailer` the trailer signature as well.
    """
    cursor = _Cursor(body)
    data = bytearray()
    chunk_sizes = []
    previous = signer.seed_signature if signer else ""
    while True:
        size_text, _, extension = cursor.line().partition(";")
        if not re.fullmatch(r"[0-9a-fA-F]+", size_text):
            raise _incomplete_body()
        chunk = cursor.take(int(size_text, 16))
        if signer is not None:
            name, _, claimed = extension.partition("=")
            if name != "chunk-signature" or not hmac.compare_digest(signer.chunk(previous, chunk),
                                                                    claimed):
                raise _signature_mismatch()
            previous = claimed
        elif extension:
            raise _incomplete_body()
        if not chunk:
            break
        if cursor.take(2) != b"\r\n":
            raise _incomplete_body()
        data += chunk
        chunk_sizes.append(len(chunk))
    if signer is not None and any(size < _MIN_SIGNED_CHUNK_SIZE for size in chunk_sizes[:-1]):
        raise S3Error(403, "InvalidChunkSizeError",
                      f"Only the last chunk is allowed to have a size less than {_MIN_SIGNED_CHUNK_SIZE} bytes")
    trailers = {}
    while line := cursor.line():
        name, separator, value = line.partition(":")
        if not separator:
            raise _malformed_trailer()
        trailers[name.strip().lower()] = value.strip()
    if not cursor.at_end():
        raise _incomplete_body()
    if signed_trailer:
        claimed = trailers.pop("x-amz-trailer-signature", "")
        canonical = "".join(f"{name}:{value}\n" for name, value in trailers.items())
        if not hmac.compare_digest(signer.trailer(previous, canonical), claimed):
            raise _signature_mismatch()
    return bytes(data), trailers


@dataclass(frozen=True)
class _Payload:
    data: bytes
    checksum: tuple[str, str] | None  # verified (algorithm, base64 value), if the client sent one


def _verified_payload(incoming: _Incoming, principal: _Principal, body: bytes) -> _Payload:
    """Decode the body and check every integrity claim the request makes about it."""
    unknown = [name for name in incoming.headers.keys() if name.lower().startswith("x-amz-checksum-")
               and name.lower() not in (*_CHECKSUM_HEADERS, *_CHECKSUM_CONTROL_HEADERS)]
    if unknown:
        # An integrity claim this server cannot verify must not pass silently.
        raise _not_implemented(unknown[0])
    claims = [(name, incoming.headers[name]) for name in _CHECKSUM_HEADERS if name in incoming.headers]
    mode = principal.payload_hash
    if mode in _STREAMING_MODES:
        data, trailer_claims = _decoded_stream(incoming, principal.chunk_signer, mode, body)
        claims += trailer_claims
    else:
        data = body
        if mode != UNSIGNED_PAYLOAD and hashlib.sha256(data).hexdigest() != mode:
            raise S3Error(400, "XAmzContentSHA256Mismatch",
                          "The provided 'x-amz-content-sha256' header does not match what was computed.",
                          {"ClientComputedContentSHA256": mode,
                           "S3ComputedContentSHA256": hashlib.sha256(data).hexdigest()})
    if len(claims) > 1:
        raise _invalid_request("Expecting a single x-amz-checksum- header. Multiple checksum Types "
                               "are not allowed.")
    content_md5 = incoming.headers.get("Content-MD5")
    if content_md5 is not None:
        claimed_md5 = b64decode_or_none(content_md5)
        if claimed_md5 is None or len(claimed_md5) != 16:
            raise S3Error(400, "InvalidDigest", "The Content-MD5 you specified is not valid.")
        if claimed_md5 != hashlib.md5(data).digest():
            raise S3Error(400, "BadDigest", "The Content-MD5 you specified did not match what we received.")
    return _Payload(data, _verify_checksum(*claims[0], data) if claims else None)


def _decoded_stream(incoming: _Incoming, signer: ChunkSigner | None, mode: str,
                    body: bytes) -> tuple[bytes, list[tuple[str, str]]]:
    """Decode an aws-chunked body; return its data and the checksum its trailer claims."""
    decoded_length = incoming.headers.get("x-amz-decoded-content-length")
    if decoded_length is None or not decoded_length.isdigit():
        raise S3Error(411, "MissingContentLength", "You must provide the Content-Length HTTP header.")
    data, trailers = decode_aws_chunked(body, signer=signer, signed_trailer=mode == STREAMING_SIGNED_TRAILER)
    if len(data) != int(decoded_length):
        raise S3Error(400, "IncompleteBody", "You did not provide the number of bytes specified by the "
                                             "x-amz-decoded-content-length HTTP header")
    if mode not in _TRAILER_MODES:
        if trailers:
            raise _malformed_trailer()
        return data, []
    trailer = (incoming.headers.get("x-amz-trailer") or "").strip().lower()
    if trailer not in _CHECKSUM_HEADERS or set(trailers) != {trailer}:
        raise _malformed_trailer()
    return data, [(trailer, trailers[trailer])]


# --- stored state ---------------------------------------------------------------------

@dataclass(frozen=True)
class StoredObject:
    """An object as held at rest. `data_on_disk` is ciphertext: never the plaintext."""

    data_on_disk: bytes
    sse_customer_key_md5: str | None  # base64 MD5 of the customer key, for SSE-C objects
    size: int  # plaintext length
    etag: str  # quoted, as in the ETag header
    metadata: dict[str, str]  # user metadata, names without the x-amz-meta- prefix
    last_modified: dt.datetime
    content_headers: tuple[tuple[str, str], ...]
    checksum: tuple[str, str] | None  # (algorithm, base64) of the whole object; single PUTs only
    parts_count: int | None  # None unless made by a multipart upload
    segment_sizes: tuple[int, ...]  # data_on_disk is these independently sealed segments
    key_fingerprint: KeyFingerprint | None
    tags: tuple[tuple[str, str], ...] = ()  # object tags (x-amz-tagging), in order


@dataclass(frozen=True)
class _Part:
    sealed: bytes
    size: int
    etag: str
    checksum: tuple[str, str] | None
    last_modified: dt.datetime


@dataclass
class _Upload:
    upload_id: str
    bucket: str
    key: str
    key_fingerprint: KeyFingerprint | None
    key_md5: str | None
    metadata: dict[str, str]
    content_headers: tuple[tuple[str, str], ...]
    checksum_algorithm: str | None
    tags: tuple[tuple[str, str], ...] = ()
    parts: dict[int, _Part] = field(default_factory=dict)


@dataclass
class _Bucket:
    name: str
    created: dt.datetime
    block_sse_c: bool
    objects: dict[str, StoredObject] = field(default_factory=dict)


def _quoted_md5(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'


class _Store:
    def __init__(self, credentials: dict[str, str], region: str):
        self.credentials = credentials
        self.region = region
        self.lock = threading.Lock()
        self.buckets: dict[str, _Bucket] = {}
        self.uploads: dict[str, _Upload] = {}
        self._server_key = AESGCM.generate_key(256)

    def add_bucket(self, name: str, block_sse_c: bool) -> bool:
        if not _valid_bucket_name(name):
            raise S3Error(400, "InvalidBucketName", "The specified bucket is not valid.", {"BucketName": name})
        with self.lock:
            if name in self.buckets:
                return False
            self.buckets[name] = _Bucket(name, utc_now(), block_sse_c)
            return True

    def seal(self, customer_key: CustomerKey | None, data: bytes) -> bytes:
        return seal(customer_key.key if customer_key else self._server_key, data)

    def plaintext(self, obj: StoredObject, customer_key: CustomerKey | None) -> bytes:
        key = customer_key.key if customer_key else self._server_key
        pieces, offset = [], 0
        for size in obj.segment_sizes:
            pieces.append(unseal(key, obj.data_on_disk[offset:offset + size]))
            offset += size
        return b"".join(pieces)

    def new_object(self, data: bytes, customer_key: CustomerKey | None, *, metadata: dict[str, str],
                   content_headers: tuple[tuple[str, str], ...],
                   checksum: tuple[str, str] | None, tags: tuple[tuple[str, str], ...] = ()) -> StoredObject:
        sealed = self.seal(customer_key, data)
        return StoredObject(
            data_on_disk=sealed,
            sse_customer_key_md5=customer_key.md5 if customer_key else None,
            size=len(data),
            # The ETag of an SSE-C object must not be the MD5 of its plaintext.
            etag=_quoted_md5(sealed if customer_key else data),
            metadata=metadata, last_modified=utc_now(), content_headers=content_headers,
            checksum=checksum, parts_count=None, segment_sizes=(len(sealed),),
            key_fingerprint=KeyFingerprint.of(customer_key.key) if customer_key else None, tags=tags)

    def handle(self, incoming: _Incoming, read_body: Callable[[], tuple[bytes, bool]]) -> Response:
        bucket, key = _address(incoming)
        level = "object" if key else "bucket" if bucket else "service"
        selector = frozenset(name for name, _ in incoming.query if name in _SUBRESOURCES)
        principal = _authenticate(incoming, self.credentials, self.region, dt.datetime.now(dt.UTC))
        operation = _OPERATIONS.get((incoming.method, level, selector))
        if operation is None:
            raise _not_implemented()
        body, has_length = read_body()
        payload = _verified_payload(incoming, principal, body)
        return operation(_Call(self, incoming, bucket, key, payload, has_length))


# --- requests and responses -----------------------------------------------------------

@dataclass(frozen=True)
class _Incoming:
    method: str
    raw_path: str  # still percent-encoded
    query: list[tuple[str, str]]  # decoded, in order
    headers: Message
    secure: bool


def _address(incoming: _Incoming) -> tuple[str | None, str | None]:
    """(bucket, key) from a path-style or virtual-hosted-style request."""
    return bucket_and_key(incoming.headers.get("Host", ""), incoming.raw_path)


def _xml_response(root: ET.Element, headers: list[tuple[str, str]] | None = None) -> Response:
    return xml_response(root, headers, namespace=_XMLNS)


def _error_response(error: S3Error, resource: str, request_id: str) -> Response:
    root = xml_element("Error", None, xml_element("Code", error.code), xml_element("Message", error.message))
    root.extend(xml_element(name, value) for name, value in error.details.items())
    root.extend([xml_element("Resource", resource), xml_element("RequestId", request_id)])
    body = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return Response(error.status, [("Content-Type", "application/xml")], body)


def _encryption_headers(customer_key_md5: str | None) -> list[tuple[str, str]]:
    if customer_key_md5 is None:
        return [("x-amz-server-side-encryption", "AES256")]
    return [(_SSE_C + "algorithm", "AES256"), (_SSE_C + "key-MD5", customer_key_md5)]


def _user_metadata(headers: Message) -> dict[str, str]:
    return {name.lower().removeprefix("x-amz-meta-"): value for name, value in headers.items()
            if name.lower().startswith("x-amz-meta-")}


def _content_headers(headers: Message) -> tuple[tuple[str, str], ...]:
    stored = []
    for name in _STORED_CONTENT_HEADERS:
        value = headers.get(name)
        if name == "Content-Encoding" and value is not None:
            # aws-chunked describes the request framing, not the object.
            value = ",".join(coding.strip() for coding in value.split(",")
                             if coding.strip().lower() != "aws-chunked") or None
        if value is not None:
            stored.append((name, value))
    if headers.get("Content-Type") is None:
        stored.append(("Content-Type", "binary/octet-stream"))
    return tuple(stored)


@dataclass
class _Call(CallParameters):
    """One authenticated request, routed to an operation."""

    store: _Store
    incoming: _Incoming
    bucket_name: str | None
    key: str | None
    payload: _Payload
    has_length: bool

    def bucket(self, name: str | None = None) -> _Bucket:
        name = name or self.bucket_name
        bucket = self.store.buckets.get(name)
        if bucket is None:
            raise S3Error(404, "NoSuchBucket", "The specified bucket does not exist", {"BucketName": name})
        return bucket

    def object(self, bucket_name: str | None = None, key: str | None = None) -> StoredObject:
        bucket = self.bucket(bucket_name)
        key = key or self.key
        obj = bucket.objects.get(key)
        if obj is None:
            raise S3Error(404, "NoSuchKey", "The specified key does not exist.", {"Key": key})
        return obj

    def upload(self) -> _Upload:
        self.bucket()
        upload_id = self.params["uploadId"]
        upload = self.store.uploads.get(upload_id)
        if upload is None or (upload.bucket, upload.key) != (self.bucket_name, self.key):
            raise S3Error(404, "NoSuchUpload", "The specified upload does not exist. The upload ID may "
                          "be invalid, or the upload may have been aborted or completed.",
                          {"UploadId": upload_id})
        return upload

    def customer_key(self, prefix: str = _SSE_C, *, read: bool = False) -> CustomerKey | None:
        return _customer_key(self.incoming.headers, prefix, self.incoming.secure, read=read)

    def destination_key(self, bucket: _Bucket) -> CustomerKey | None:
        """The SSE-C key for data written into `bucket`, if the request asks for SSE-C."""
        requested = any(name.lower().startswith(_SSE_C) for name in self.incoming.headers.keys())
        if requested and bucket.block_sse_c:
            # AWS refuses blocked SSE-C writes before looking at the key material.
            raise _access_denied()
        customer_key = self.customer_key()
        server_side = self.header("x-amz-server-side-encryption")
        if server_side is not None:
            if customer_key is not None:
                raise S3Error(400, "InvalidArgument", "Server Side Encryption with Customer provided key is "
                              "incompatible with the encryption method specified",
                              {"ArgumentName": _SSE_ARGUMENT, "ArgumentValue": server_side})
            if server_side in ("aws:kms", "aws:kms:dsse"):
                raise _not_implemented("x-amz-server-side-encryption")
            if server_side != "AES256":
                raise _invalid_argument("The encryption method specified is not supported",
                                        "x-amz-server-side-encryption")
        return customer_key

    def copy_source(self) -> tuple[StoredObject, CustomerKey | None]:
        """The x-amz-copy-source object, checked against the copy-source SSE-C key."""
        path, _, version = unquote(self.header("x-amz-copy-source")).partition("?")
        if version:
            raise _not_implemented("x-amz-copy-source")
        bucket, _, key = path.lstrip("/").partition("/")
        if not bucket or not key:
            raise _invalid_argument("Copy Source must mention the source bucket and key: "
                                    "sourcebucket/sourcekey", "x-amz-copy-source")
        source = self.object(bucket, key)
        source_key = self.customer_key(_COPY_SOURCE_SSE_C)
        _check_read_key(source.key_fingerprint, source_key, copy_source=True)
        return source, source_key

    def require_length(self) -> None:
        if not self.has_length:
            raise S3Error(411, "MissingContentLength", "You must provide the Content-Length HTTP header.")


# --- operations -----------------------------------------------------------------------

def _list_buckets(call: _Call) -> Response:
    with call.store.lock:
        buckets = sorted(call.store.buckets.values(), key=lambda bucket: bucket.name)
    return _xml_response(xml_element(
        "ListAllMyBucketsResult", None,
        xml_element("Owner", None, xml_element("ID", _OWNER_ID), xml_element("DisplayName", "upstream")),
        xml_element("Buckets", None, *(
            xml_element("Bucket", None, xml_element("Name", bucket.name),
                        xml_element("CreationDate", iso_date(bucket.created)),
                        xml_element("BucketRegion", call.store.region))
            for bucket in buckets))))


def _create_bucket(call: _Call) -> Response:
    name = call.bucket_name
    constraint = None
    if call.payload.data:
        constraint = xml_child_text(parse_xml(call.payload.data, "CreateBucketConfiguration", _malformed_xml),
                                    "LocationConstraint") or None
    expected = None if call.store.region == "us-east-1" else call.store.region
    if constraint != expected:
        raise S3Error(400, "IllegalLocationConstraintException",
                      f"The {constraint or 'unspecified'} location constraint is incompatible for "
                      "the region specific endpoint this request was sent to.")
    created = call.store.add_bucket(name, block_sse_c=False)
    # us-east-1 answers 200 to re-creating your own bucket, for legacy compatibility.
    if not created and call.store.region != "us-east-1":
        raise S3Error(409, "BucketAlreadyOwnedByYou", "Your previous request to create the named "
                      "bucket succeeded and you already own it.", {"BucketName": name})
    return Response(200, [("Location", f"/{name}")])


def _valid_bucket_name(name: str) -> bool:
    if not _BUCKET_NAME.fullmatch(name) or ".." in name:
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return True
    return False


def _head_bucket(call: _Call) -> Response:
    call.bucket()
    return Response(200, [("x-amz-bucket-region", call.store.region)])


def _list_objects_v1(call: _Call) -> Response:
    return _list_objects(call, version=1)


def _list_objects_v2(call: _Call) -> Response:
    if call.params["list-type"] != "2":
        raise _invalid_argument("Invalid List Type specified in Request", "list-type")
    return _list_objects(call, version=2)


def _list_objects(call: _Call, version: int) -> Response:
    bucket = call.bucket()
    params = call.params
    prefix = params.get("prefix", "")
    delimiter = params.get("delimiter", "")
    max_keys_text = params.get("max-keys", "1000")
    if not max_keys_text.isdigit():
        raise _invalid_argument("Provided max-keys not an integer or within integer range", "max-keys")
    max_keys = min(int(max_keys_text), 1000)
    encoding = params.get("encoding-type")
    if encoding not in (None, "url"):
        raise _invalid_argument("Invalid Encoding Method specified in Request", "encoding-type")
    encode = (lambda text: quote(text, safe="/")) if encoding == "url" else (lambda text: text)
    if version == 2:
        token = params.get("continuation-token")
        marker = _decode_token(token) if token is not None else params.get("start-after", "")
    else:
        marker = params.get("marker", "")
    with call.store.lock:
        objects = dict(bucket.objects)

    entries: list[tuple[str, StoredObject | None]] = []  # keys and common prefixes, in order
    seen_prefixes = set()
    for name in sorted(objects):
        if name <= marker or not name.startswith(prefix):
            continue
        cut = name.find(delimiter, len(prefix)) if delimiter else -1
        if cut < 0:
            entries.append((name, objects[name]))
            continue
        common = name[:cut + len(delimiter)]
        if common not in seen_prefixes and common > marker:
            seen_prefixes.add(common)
            entries.append((common, None))
    page = entries[:max_keys]
    truncated = bool(page) and len(entries) > max_keys

    root = xml_element("ListBucketResult", None, xml_element("Name", bucket.name),
                       xml_element("Prefix", encode(prefix)))
    if version == 2:
        root.append(xml_element("KeyCount", len(page)))
        if "continuation-token" in params:
            root.append(xml_element("ContinuationToken", params["continuation-token"]))
        if "start-after" in params:
            root.append(xml_element("StartAfter", encode(params["start-after"])))
        if truncated:
            root.append(xml_element("NextContinuationToken", _encode_token(page[-1][0])))
    else:
        root.append(xml_element("Marker", encode(marker)))
        if truncated and delimiter:
            root.append(xml_element("NextMarker", encode(page[-1][0])))
    root.append(xml_element("MaxKeys", max_keys))
    if delimiter:
        root.append(xml_element("Delimiter", encode(delimiter)))
    if encoding:
        root.append(xml_element("EncodingType", encoding))
    root.append(xml_element("IsTruncated", str(truncated).lower()))
    for name, obj in page:
        if obj is None:
            root.append(xml_element("CommonPrefixes", None, xml_element("Prefix", encode(name))))
        else:
            root.append(xml_element("Contents", None, xml_element("Key", encode(name)),
                                    xml_element("LastModified", iso_date(obj.last_modified)),
                                    xml_element("ETag", obj.etag), xml_element("Size", obj.size),
                                    xml_element("StorageClass", "STANDARD")))
    return _xml_response(root)


def _encode_token(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode()


def _decode_token(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, ValueError):
        raise _invalid_argument("The continuation token provided is incorrect", "continuation-token") from None


def _delete_objects(call: _Call) -> Response:
    bucket = call.bucket()
    if call.header("Content-MD5") is None and call.payload.checksum is None:
        raise _invalid_request("Missing required header for this request: Content-MD5")
    root = parse_xml(call.payload.data, "Delete", _malformed_xml)
    keys = [xml_child_text(entry, "Key") for entry in xml_children(root, "Object")]
    if not keys or len(keys) > 1000 or None in keys:
        raise _malformed_xml()
    with call.store.lock:
        for key in keys:
            bucket.objects.pop(key, None)
    quiet = (xml_child_text(root, "Quiet") or "").lower() == "true"
    deleted = [] if quiet else [xml_element("Deleted", None, xml_element("Key", key)) for key in keys]
    return _xml_response(xml_element("DeleteResult", None, *deleted))


def _put_object(call: _Call) -> Response:
    if call.header("x-amz-copy-source") is not None:
        return _copy_object(call)
    bucket = call.bucket()
    customer_key = call.destination_key(bucket)
    call.require_length()
    obj = call.store.new_object(call.payload.data, customer_key,
                                metadata=_user_metadata(call.incoming.headers),
                                content_headers=_content_headers(call.incoming.headers),
                                checksum=call.payload.checksum, tags=_tags(call.header("x-amz-tagging")))
    with call.store.lock:
        bucket.objects[call.key] = obj
    headers = [("ETag", obj.etag), *_encryption_headers(obj.sse_customer_key_md5)]
    if obj.checksum is not None:
        headers.append((f"x-amz-checksum-{obj.checksum[0]}", obj.checksum[1]))
    return Response(200, headers)


def _tags(header: str | None) -> tuple[tuple[str, str], ...]:
    """x-amz-tagging: URL query form, key1=value1&key2=value2."""
    return tuple(parse_query(header)) if header else ()


def _get_object_tagging(call: _Call) -> Response:
    root = xml_element("Tagging", None, xml_element("TagSet", None, *(
        xml_element("Tag", None, xml_element("Key", name), xml_element("Value", value))
        for name, value in call.object().tags)))
    return _xml_response(root)


def _copy_object(call: _Call) -> Response:
    bucket = call.bucket()
    customer_key = call.destination_key(bucket)
    source, source_key = call.copy_source()
    directive = call.header("x-amz-metadata-directive") or "COPY"
    if directive not in ("COPY", "REPLACE"):
        raise _invalid_argument("Unknown metadata directive.", "x-amz-metadata-directive")
    same_object = source is bucket.objects.get(call.key)
    changes_something = directive == "REPLACE" or customer_key is not None or any(
        call.header(name) is not None
        for name in ("x-amz-server-side-encryption", "x-amz-storage-class", "x-amz-website-redirect-location"))
    if same_object and not changes_something:
        raise _invalid_request("This copy request is illegal because it is trying to copy an object to "
                               "itself without changing the object's metadata, storage class, website "
                               "redirect location or encryption attributes.")
    if directive == "COPY":
        metadata, content_headers = source.metadata, source.content_headers
    else:
        metadata = _user_metadata(call.incoming.headers)
        content_headers = _content_headers(call.incoming.headers)
    tags = _tags(call.header("x-amz-tagging")) if call.header("x-amz-tagging-directive") == "REPLACE" else source.tags
    obj = call.store.new_object(call.store.plaintext(source, source_key), customer_key,
                                metadata=metadata, content_headers=content_headers,
                                checksum=source.checksum, tags=tags)
    with call.store.lock:
        bucket.objects[call.key] = obj
    return _xml_response(
        xml_element("CopyObjectResult", None, xml_element("LastModified", iso_date(obj.last_modified)),
                    xml_element("ETag", obj.etag)),
        _encryption_headers(obj.sse_customer_key_md5))


def _get_object(call: _Call) -> Response:
    return _object_response(call, include_body=True)


def _head_object(call: _Call) -> Response:
    return _object_response(call, include_body=False)


def _object_response(call: _Call, include_body: bool) -> Response:
    obj = call.object()
    customer_key = call.customer_key(read=True)
    _check_read_key(obj.key_fingerprint, customer_key)
    validators = [("ETag", obj.etag), ("Last-Modified", http_date(obj.last_modified))]
    if_match = call.header("If-Match")
    if if_match is not None and not _etag_matches(if_match, obj.etag):
        raise S3Error(412, "PreconditionFailed", "At least one of the pre-conditions you specified "
                      "did not hold", {"Condition": "If-Match"})
    if_none_match = call.header("If-None-Match")
    if if_none_match is not None and _etag_matches(if_none_match, obj.etag):
        return Response(304, validators)

    content_headers = dict(obj.content_headers)
    content_headers.update((_RESPONSE_OVERRIDES[name], value) for name, value in call.params.items()
                           if name in _RESPONSE_OVERRIDES)
    headers = [*validators, ("Accept-Ranges", "bytes"), *content_headers.items(),
               *((f"x-amz-meta-{name}", value) for name, value in obj.metadata.items()),
               *_encryption_headers(obj.sse_customer_key_md5)]
    byte_range = _byte_range(call.header("Range"), obj.size)
    if byte_range is None:
        status, (first, last) = 200, (0, obj.size - 1)
        if obj.checksum is not None and call.header("x-amz-checksum-mode") == "ENABLED":
            headers.append((f"x-amz-checksum-{obj.checksum[0]}", obj.checksum[1]))
    else:
        status, (first, last) = 206, byte_range
        headers.append(("Content-Range", f"bytes {first}-{last}/{obj.size}"))
    headers.append(("Content-Length", str(last - first + 1)))
    body = call.store.plaintext(obj, customer_key)[first:last + 1] if include_body else b""
    return Response(status, headers, body)


def _etag_matches(condition: str, etag: str) -> bool:
    candidates = {candidate.strip().removeprefix("W/") for candidate in condition.split(",")}
    return "*" in candidates or etag in candidates or etag.strip('"') in candidates


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (first, last) bytes of a single `bytes=` range; None when the header is to be ignored."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    first_text, dash, last_text = spec.strip().partition("-")
    if unit.strip().lower() != "bytes" or not dash or not (first_text + last_text).isdigit():
        return None  # S3 serves the whole object for ranges it cannot honour
    if first_text:
        first = int(first_text)
        if last_text and int(last_text) < first:
            return None
        last = min(int(last_text), size - 1) if last_text else size - 1
    else:
        suffix = int(last_text)
        first, last = (max(size - suffix, 0) if suffix else size), size - 1
    if first >= size:
        raise S3Error(416, "InvalidRange", "The requested range is not satisfiable",
                      {"RangeRequested": header, "ActualObjectSize": str(size)})
    return first, last


def _delete_object(call: _Call) -> Response:
    bucket = call.bucket()
    with call.store.lock:
        bucket.objects.pop(call.key, None)
    return Response(204)


def _get_object_attributes(call: _Call) -> Response:
    obj = call.object()
    _check_read_key(obj.key_fingerprint, call.customer_key(read=True))
    wanted = {name.strip() for name in (call.header("x-amz-object-attributes") or "").split(",")}
    known = {"ETag", "Checksum", "ObjectParts", "StorageClass", "ObjectSize"}
    if not wanted <= known:
        raise _invalid_argument("Invalid attribute name specified.", "x-amz-object-attributes")
    root = xml_element("GetObjectAttributesResponse")
    if "ETag" in wanted:
        root.append(xml_element("ETag", obj.etag.strip('"')))
    if "Checksum" in wanted and obj.checksum is not None:
        root.append(xml_element("Checksum", None, xml_element(_CHECKSUM_XML[obj.checksum[0]], obj.checksum[1])))
    if "ObjectParts" in wanted and obj.parts_count is not None:
        root.append(xml_element("ObjectParts", None, xml_element("TotalPartsCount", obj.parts_count)))
    if "StorageClass" in wanted:
        root.append(xml_element("StorageClass", "STANDARD"))
    if "ObjectSize" in wanted:
        root.append(xml_element("ObjectSize", obj.size))
    return _xml_response(root, [("Last-Modified", http_date(obj.last_modified))])


def _create_multipart_upload(call: _Call) -> Response:
    bucket = call.bucket()
    customer_key = call.destination_key(bucket)
    algorithm = call.header("x-amz-checksum-algorithm")
    if algorithm is not None and algorithm.lower() not in CHECKSUMS:
        raise _invalid_argument("Checksum algorithm provided is unsupported. Please try again with any "
                                "of the valid types: [CRC32, CRC32C, CRC64NVME, SHA1, SHA256]",
                                "x-amz-checksum-algorithm")
    upload = _Upload(upload_id=secrets.token_urlsafe(48), bucket=bucket.name, key=call.key,
                     key_fingerprint=KeyFingerprint.of(customer_key.key) if customer_key else None,
                     key_md5=customer_key.md5 if customer_key else None,
                     metadata=_user_metadata(call.incoming.headers),
                     content_headers=_content_headers(call.incoming.headers),
                     checksum_algorithm=algorithm.lower() if algorithm else None,
                     tags=_tags(call.header("x-amz-tagging")))
    with call.store.lock:
        call.store.uploads[upload.upload_id] = upload
    headers = _encryption_headers(upload.key_md5)
    if algorithm is not None:
        headers.append(("x-amz-checksum-algorithm", algorithm.upper()))
    return _xml_response(xml_element("InitiateMultipartUploadResult", None, xml_element("Bucket", bucket.name),
                                     xml_element("Key", call.key), xml_element("UploadId", upload.upload_id)),
                         headers)


def _upload_part(call: _Call) -> Response:
    upload = call.upload()
    part_number = call.params["partNumber"]
    if not part_number.isdigit() or not 1 <= int(part_number) <= _MAX_PART_NUMBER:
        raise _invalid_argument(f"Part number must be an integer between 1 and {_MAX_PART_NUMBER}, "
                                "inclusive", "partNumber")
    copying = call.header("x-amz-copy-source") is not None
    if copying:
        source, source_key = call.copy_source()
        first, last = _copy_source_range(call.header("x-amz-copy-source-range"), source.size)
        data, checksum = call.store.plaintext(source, source_key)[first:last + 1], None
    else:
        call.require_length()
        data, checksum = call.payload.data, call.payload.checksum
    customer_key = call.customer_key()
    if upload.key_fingerprint is None:
        if customer_key is not None:
            raise _part_key_mismatch()
    elif customer_key is None:
        raise _invalid_request("The multipart upload initiate requested encryption. Subsequent part "
                               "requests must include the appropriate encryption parameters.")
    elif not upload.key_fingerprint.matches(customer_key.key):
        raise _part_key_mismatch()
    sealed = call.store.seal(customer_key, data)
    part = _Part(sealed=sealed, size=len(data), etag=_quoted_md5(sealed if customer_key else data),
                 checksum=checksum, last_modified=utc_now())
    with call.store.lock:
        upload.parts[int(part_number)] = part
    headers = _encryption_headers(upload.key_md5)
    if copying:
        return _xml_response(xml_element("CopyPartResult", None,
                                         xml_element("LastModified", iso_date(part.last_modified)),
                                         xml_element("ETag", part.etag)), headers)
    if checksum is not None:
        headers.append((f"x-amz-checksum-{checksum[0]}", checksum[1]))
    return Response(200, [("ETag", part.etag), *headers])


def _part_key_mismatch() -> S3Error:
    return _invalid_argument("The provided encryption parameters did not match the ones used originally.",
                             _SSE_C + "key")


def _copy_source_range(header: str | None, size: int) -> tuple[int, int]:
    if header is None:
        return 0, size - 1
    match = re.fullmatch(r"bytes=(\d+)-(\d+)", header.strip())
    if match is None or int(match[1]) > int(match[2]):
        raise _invalid_argument("The x-amz-copy-source-range value must be of the form bytes=first-last "
                                "where first and last are the zero-based offsets of the first and last "
                                "bytes to copy", "x-amz-copy-source-range")
    first, last = int(match[1]), int(match[2])
    if last >= size:
        raise S3Error(400, "InvalidRange", "The requested range is not satisfiable",
                      {"RangeRequested": header, "ActualObjectSize": str(size)})
    return first, last


def _complete_multipart_upload(call: _Call) -> Response:
    upload = call.upload()
    root = parse_xml(call.payload.data, "CompleteMultipartUpload", _malformed_xml)
    listed = xml_children(root, "Part")
    if not listed:
        raise _malformed_xml()
    numbers = []
    parts = []
    for entry in listed:
        number_text, etag = xml_child_text(entry, "PartNumber"), xml_child_text(entry, "ETag")
        if number_text is None or not number_text.isdigit() or etag is None:
            raise _malformed_xml()
        number = int(number_text)
        if numbers and number <= numbers[-1]:
            raise S3Error(400, "InvalidPartOrder", "The list of parts was not in ascending order. The "
                          "parts list must be specified in order by part number.")
        part = upload.parts.get(number)
        if part is None or part.etag.strip('"') != etag.strip().strip('"'):
            raise _invalid_part(upload, number)
        if upload.checksum_algorithm is not None:
            claimed = xml_child_text(entry, _CHECKSUM_XML[upload.checksum_algorithm])
            if claimed is None:
                raise _invalid_request(f"The upload was created using a {upload.checksum_algorithm} "
                                       "checksum. The complete request must include the checksum for "
                                       f"each part. It was missing for part {number} in the request.")
            if part.checksum != (upload.checksum_algorithm, claimed):
                raise _invalid_part(upload, number)
        numbers.append(number)
        parts.append(part)
    for number, part in zip(numbers[:-1], parts[:-1]):
        if part.size < _MIN_PART_SIZE:
            raise S3Error(400, "EntityTooSmall", "Your proposed upload is smaller than the minimum "
                          "allowed object size.", {"ProposedSize": str(part.size),
                                                   "MinSizeAllowed": str(_MIN_PART_SIZE),
                                                   "PartNumber": str(number), "ETag": part.etag})
    part_digests = b"".join(bytes.fromhex(part.etag.strip('"')) for part in parts)
    obj = StoredObject(
        data_on_disk=b"".join(part.sealed for part in parts),
        sse_customer_key_md5=upload.key_md5, size=sum(part.size for part in parts),
        etag=f'"{hashlib.md5(part_digests).hexdigest()}-{len(parts)}"',
        metadata=upload.metadata, last_modified=utc_now(), content_headers=upload.content_headers,
        checksum=None, parts_count=len(parts), segment_sizes=tuple(len(part.sealed) for part in parts),
        key_fingerprint=upload.key_fingerprint, tags=upload.tags)
    bucket = call.bucket()
    with call.store.lock:
        call.store.uploads.pop(upload.upload_id, None)
        bucket.objects[call.key] = obj
    return _xml_response(
        xml_element("CompleteMultipartUploadResult", None,
                    xml_element("Location", f"/{bucket.name}/{quote(call.key)}"), xml_element("Bucket", bucket.name),
                    xml_element("Key", call.key), xml_element("ETag", obj.etag)),
        [] if obj.sse_customer_key_md5 else [("x-amz-server-side-encryption", "AES256")])


def _invalid_part(upload: _Upload, number: int) -> S3Error:
    return S3Error(400, "InvalidPart", "One or more of the specified parts could not be found. The part "
                   "may not have been uploaded, or the specified entity tag may not match the part's "
                   "entity tag.", {"UploadId": upload.upload_id, "PartNumber": str(number)})


def _abort_multipart_upload(call: _Call) -> Response:
    upload = call.upload()
    with call.store.lock:
        call.store.uploads.pop(upload.upload_id, None)
    return Response(204)


def _list_parts(call: _Call) -> Response:
    upload = call.upload()
    params = call.params
    marker_text = params.get("part-number-marker", "0")
    max_parts_text = params.get("max-parts", "1000")
    if not marker_text.isdigit() or not max_parts_text.isdigit():
        raise _invalid_argument("Part number marker and max parts must be integers")
    with call.store.lock:
        parts = sorted((number, part) for number, part in upload.parts.items() if number > int(marker_text))
    max_parts = min(int(max_parts_text), 1000)
    page, truncated = parts[:max_parts], len(parts) > max_parts
    root = xml_element("ListPartsResult", None, xml_element("Bucket", upload.bucket), xml_element("Key", upload.key),
                       xml_element("UploadId", upload.upload_id), xml_element("PartNumberMarker", marker_text),
                       xml_element("NextPartNumberMarker", page[-1][0] if page else 0),
                       xml_element("MaxParts", max_parts), xml_element("IsTruncated", str(truncated).lower()),
                       xml_element("StorageClass", "STANDARD"))
    for number, part in page:
        entry = xml_element("Part", None, xml_element("PartNumber", number),
                            xml_element("LastModified", iso_date(part.last_modified)),
                            xml_element("ETag", part.etag), xml_element("Size", part.size))
        if part.checksum is not None:
            entry.append(xml_element(_CHECKSUM_XML[part.checksum[0]], part.checksum[1]))
        root.append(entry)
    return _xml_response(root)


_OPERATIONS: dict[tuple[str, str, frozenset[str]], Callable[[_Call], Response]] = {
    ("GET", "service", frozenset()): _list_buckets,
    ("PUT", "bucket", frozenset()): _create_bucket,
    ("HEAD", "bucket", frozenset()): _head_bucket,
    ("GET", "bucket", frozenset()): _list_objects_v1,
    ("GET", "bucket", frozenset({"list-type"})): _list_objects_v2,
    ("POST", "bucket", frozenset({"delete"})): _delete_objects,
    ("PUT", "object", frozenset()): _put_object,
    ("GET", "object", frozenset()): _get_object,
    ("HEAD", "object", frozenset()): _head_object,
    ("DELETE", "object", frozenset()): _delete_object,
    ("GET", "object", frozenset({"attributes"})): _get_object_attributes,
    ("GET", "object", frozenset({"tagging"})): _get_object_tagging,
    ("POST", "object", frozenset({"uploads"})): _create_multipart_upload,
    ("PUT", "object", frozenset({"partNumber", "uploadId"})): _upload_part,
    ("POST", "object", frozenset({"uploadId"})): _complete_multipart_upload,
    ("DELETE", "object", frozenset({"uploadId"})): _abort_multipart_upload,
    ("GET", "object", frozenset({"uploadId"})): _list_parts,
}


# --- HTTP -----------------------------------------------------------------------------

class _Handler(StorageHandler):
    server_version = "AmazonS3"
    _continue_pending = False

    def handle_expect_100(self):
        # Like S3, answer 100 Continue only once the request has been authenticated.
        self._continue_pending = True
        return True

    def _serve(self):
        upstream: S3Upstream = self.server.owner
        raw_path, _, query, record = self.receive()
        request_id = secrets.token_hex(8).upper()
        incoming = _Incoming(self.command, raw_path, query, self.headers, upstream.tls)
        try:
            response = upstream._store.handle(incoming, self._read_body)
        except S3Error as error:
            response = _error_response(error, raw_path, request_id)
        except Exception:
            upstream.internal_errors.append(traceback.format_exc())
            response = _error_response(S3Error(500, "InternalError", "We encountered an internal "
                                               "error. Please try again."), raw_path, request_id)
        record.status = response.status
        self._send(response, request_id)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

    def _read_body(self) -> tuple[bytes, bool]:
        """The request body after HTTP framing, and whether the request declared a length."""
        if self._continue_pending:
            self._continue_pending = False
            self.send_response_only(100)
            self.end_headers()
        self._body_consumed = True
        transfer_encoding = self.headers.get("Transfer-Encoding")
        if transfer_encoding is not None:
            if transfer_encoding.strip().lower() != "chunked":
                raise _not_implemented("Transfer-Encoding")
            # botocore sends aws-chunked bodies this way; HTTP trailer fields carry nothing S3 reads.
            return self.read_http_chunked(_incomplete_body), True
        length = self.headers.get("Content-Length")
        if length is None:
            return b"", False
        if not length.isdigit():
            raise S3Error(400, "BadRequest", "An error occurred when parsing the HTTP request.")
        body = self.rfile.read(int(length))
        if len(body) != int(length):
            raise _incomplete_body()
        return body, True

    def _send(self, response: Response, request_id: str):
        if self.body_left_unread() or self._continue_pending:
            # The client may still send a body we did not read: this connection cannot be reused.
            self.close_after_response(response.headers)
        self._continue_pending = False
        self.write_response(response.status, [
            ("x-amz-request-id", request_id),
            ("x-amz-id-2", base64.b64encode(os.urandom(48)).decode()),
            *response.headers,
        ], response.body, without_length=(204, 304))


class S3Upstream(StorageUpstream):
    """A strict S3-compatible server on 127.0.0.1, for driving real S3 clients in tests."""

    handler = _Handler
    thread_name = "s3-upstream"

    def __init__(self, ca: trustme.CA | None, credentials: dict[str, str], *,
                 region: str = "us-east-1", tls: bool = True, port: int = 0):
        super().__init__(ca, tls=tls, port=port)
        self.region = region
        self._store = _Store(dict(credentials), region)

    def create_bucket(self, name: str, *, block_sse_c: bool = False) -> None:
        """Create a bucket directly; block_sse_c models AWS's default for new buckets since April 2026.

        Buckets made over HTTP (CreateBucket) allow SSE-C, like buckets explicitly unblocked.
        """
        if not self._store.add_bucket(name, block_sse_c):
            raise ValueError(f"bucket {name!r} already exists")

    def stored(self, bucket: str, key: str) -> StoredObject:
        with self._store.lock:
            return self._store.buckets[bucket].objects[key]


def main(argv: list[str] | None = None) -> None:
    """The README's quickstart store: this server on 127.0.0.1 until interrupted, objects in memory."""
    parser = argparse.ArgumentParser(prog="python -m tests.upstreams.s3",
                                     description="A strict local S3 that enforces SSE-C (in memory; for trying keycourier)")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--bucket", action="append", default=[], help="a bucket to create (repeatable)")
    parser.add_argument("--credentials", type=Path, default=Path("keys/app-credentials.yaml"),
                        help="YAML with the one access_key_id and secret_access_key the store accepts")
    parser.add_argument("--ca-file", type=Path, default=Path("demo-ca.pem"),
                        help="where to write the CA of the store's certificate (new each start)")
    args = parser.parse_args(argv)
    credentials = yaml.safe_load(args.credentials.read_text())
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(args.ca_file))
    upstream = S3Upstream(ca, {credentials["access_key_id"]: credentials["secret_access_key"]}, port=args.port)
    for bucket in args.bucket:
        upstream.create_bucket(bucket)
    with upstream:
        print(f"S3 at {upstream.endpoint_url}, buckets: {', '.join(args.bucket) or 'none'}; "
              f"its CA is {args.ca_file}; Ctrl-C stops it", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
