"""A strict Alibaba Cloud OSS server for tests (the "test upstream").

It runs in a background thread of the test process and follows OSS's documented
behaviour as closely as it can, so that a proxy bug shows up as a failed request
instead of being papered over. docs/oss.md lists every rule with its source.

Objects are always encrypted at rest with AES-256-GCM under a key owned by the server;
each object records the server-side encryption the client asked for (AES256, KMS with
its key id, SM4, or none), which is what OSS reports back. Signatures (V1 and V4) are
computed by the oss2 SDK's own signers, fed the request exactly as received.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import secrets
import threading
import traceback
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from email.utils import parsedate_to_datetime
from urllib.parse import unquote

import oss2
import trustme
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# ReceivedRequest is re-exported: part of this module's API.
from tests.upstreams.common import (CallParameters, ReceivedRequest, Response, ServiceError,
                                    bucket_and_key, http_date, iso_date, parse_xml, reflected_crc,
                                    seal, unseal, utc_now, xml_child_text, xml_children,
                                    xml_element, xml_response)
from tests.upstreams.server import StorageHandler, StorageUpstream

__all__ = ["OssError", "OssUpstream", "ReceivedRequest", "StoredObject", "crc64ecma"]

_MAX_CLOCK_SKEW = dt.timedelta(minutes=15)
_V4_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
_V4_ALGORITHM = "OSS4-HMAC-SHA256"
_UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_MIN_PART_SIZE = 100 * 1024
_MAX_PART_NUMBER = 10000
_SSE = "x-oss-server-side-encryption"
_SSE_KEY_ID = "x-oss-server-side-encryption-key-id"
_SSE_ALGORITHMS = ("AES256", "KMS", "SM4")
# Query parameters that select an OSS operation; a combination missing from _OPERATIONS
# is an operation this server does not implement.
_OPERATION_PARAMS = frozenset({
    "acl", "append", "bucketInfo", "cors", "delete", "encryption", "lifecycle", "location",
    "logging", "objectMeta", "policy", "referer", "restore", "stat", "symlink", "tagging",
    "uploadId", "uploads", "versioning", "versions", "website", "worm",
})
# Encryption options this server does not model: refused rather than silently ignored.
_UNMODELLED_SSE_HEADERS = ("x-oss-server-side-data-encryption", "x-oss-server-side-encryption-context")
_STORED_CONTENT_HEADERS = ("Cache-Control", "Content-Disposition", "Content-Encoding", "Expires")

# CRC-64/ECMA-182 as OSS reports it (x-oss-hash-crc64ecma): the reflected form, all-ones
# init and final XOR, printed as an unsigned decimal.
_crc64_bytes = reflected_crc(0xC96C5795D7870F42, 64)


def crc64ecma(data: bytes) -> int:
    return int.from_bytes(_crc64_bytes(data), "big")


# --- errors ---------------------------------------------------------------------------

class OssError(ServiceError):
    """An OSS error response: status, code, message and any extra <Error> elements."""


def _invalid_argument(message: str, name: str | None = None, value: str | None = None) -> OssError:
    details = {"ArgumentName": name, "ArgumentValue": value or ""} if name else None
    return OssError(400, "InvalidArgument", message, details)


def _access_denied(message: str) -> OssError:
    return OssError(403, "AccessDenied", message)


def _not_implemented(message: str = "A header you provided implies functionality that is not "
                                    "implemented.") -> OssError:
    return OssError(400, "NotImplemented", message)  # OSS answers NotImplemented with 400


def _incomplete_body() -> OssError:
    return OssError(400, "IncompleteBody", "The request body terminated unexpectedly.")


def _malformed_xml() -> OssError:
    return OssError(400, "MalformedXML", "The XML you provided was not well-formed or did not "
                    "validate against our published schema.")


# --- authentication -------------------------------------------------------------------

def _sdk_request(incoming: _Incoming, params: dict[str, str], **extra) -> oss2.http.Request:
    """The request as oss2 would have built it before signing, for oss2's signers."""
    headers = oss2.CaseInsensitiveDict()
    for name in incoming.headers.keys():
        if name.lower() not in headers:
            # Repeated headers are combined with commas before signing (RFC 2616 4.2).
            headers[name] = ",".join(incoming.headers.get_all(name))
    return oss2.http.Request(incoming.method, "https://unused", params=params, headers=headers, **extra)


def _secret_for(access_key: str, credentials: dict[str, str]) -> str:
    secret = credentials.get(access_key)
    if secret is None:
        raise OssError(403, "InvalidAccessKeyId", "The OSS Access Key Id you provided does not "
                       "exist in our records.", {"OSSAccessKeyId": access_key})
    return secret


def _check_skew(request_time: dt.datetime, now: dt.datetime) -> None:
    if abs(now - request_time) > _MAX_CLOCK_SKEW:
        raise OssError(403, "RequestTimeTooSkewed", "The difference between the request time and "
                       "the current time is too large.", {"MaxAllowedSkewMilliseconds": "900000"})


def _signature_mismatch(access_key: str, provided: str, string_to_sign: bytes) -> OssError:
    return OssError(403, "SignatureDoesNotMatch", "The request signature we calculated does not "
                    "match the signature you provided. Check your key and signing method.",
                    {"OSSAccessKeyId": access_key, "SignatureProvided": provided,
                     "StringToSign": string_to_sign.decode("utf-8", "replace"),
                     "StringToSignBytes": " ".join(f"{byte:02x}" for byte in string_to_sign)})


def v1_signature(request: oss2.http.Request, bucket: str | None, key: str | None,
                 access_key: str, secret_key: str) -> tuple[str, bytes]:
    """(signature, string to sign) by oss2's V1 signer, for a request as received."""
    auth = oss2.Auth(access_key, secret_key)
    credentials = auth.credentials_provider.get_credentials()
    string_to_sign = auth._ProviderAuth__get_bytes_to_sign(request, bucket, key or "")
    return auth._ProviderAuth__make_signature(request, bucket, key or "", credentials), string_to_sign


def v4_signature(request: oss2.http.Request, bucket: str | None, key: str | None, access_key: str,
                 secret_key: str, additional_headers: list[str], timestamp: str) -> str:
    """The V4 signature by oss2's signer; `request` carries region and product."""
    auth = oss2.AuthV4(access_key, secret_key)
    credentials = auth.credentials_provider.get_credentials()
    return auth._ProviderAuthV4__make_signature(request, bucket, key or "", additional_headers,
                                                credentials, timestamp)


def _authenticate(incoming: _Incoming, bucket: str | None, key: str | None,
                  credentials: dict[str, str], region: str, now: dt.datetime) -> None:
    authorization = incoming.headers.get("Authorization")
    query = dict(incoming.query)
    if authorization is None:
        if "OSSAccessKeyId" in query:
            return _authenticate_presigned_v1(incoming, bucket, key, query, credentials, now)
        if "x-oss-signature-version" in query:
            raise _not_implemented("Presigned URLs of signature version 2 and 4 are not implemented.")
        raise _access_denied("You have no right to access this object because of bucket acl.")
    scheme, _, rest = authorization.strip().partition(" ")
    if scheme == "OSS":
        return _authenticate_v1(incoming, bucket, key, rest, credentials, now)
    if scheme == _V4_ALGORITHM:
        return _authenticate_v4(incoming, bucket, key, rest, credentials, region, now)
    if scheme == "OSS2":
        raise _not_implemented("Signature version 2 is not implemented.")
    raise _invalid_argument("Authorization header is invalid.", "Authorization", authorization)


def _authenticate_v1(incoming: _Incoming, bucket: str | None, key: str | None, fields: str,
                     credentials: dict[str, str], now: dt.datetime) -> None:
    access_key, separator, provided = fields.rpartition(":")
    if not separator or not access_key:
        raise _invalid_argument("Authorization header is invalid.", "Authorization", f"OSS {fields}")
    secret_key = _secret_for(access_key, credentials)
    date_text = incoming.headers.get("x-oss-date") or incoming.headers.get("Date")
    try:
        request_time = parsedate_to_datetime(date_text)
    except (TypeError, ValueError):
        raise _access_denied("OSS authentication requires a valid Date.") from None
    _check_skew(request_time, now)
    request = _sdk_request(incoming, dict(incoming.query))
    expected, string_to_sign = v1_signature(request, bucket, key, access_key, secret_key)
    if not hmac.compare_digest(expected, provided):
        raise _signature_mismatch(access_key, provided, string_to_sign)


def _authenticate_presigned_v1(incoming: _Incoming, bucket: str | None, key: str | None,
                               query: dict[str, str], credentials: dict[str, str],
                               now: dt.datetime) -> None:
    if "Expires" not in query or "Signature" not in query:
        raise _access_denied("Query-string authentication requires the Signature, Expires and "
                             "OSSAccessKeyId parameters")
    access_key = query["OSSAccessKeyId"]
    secret_key = _secret_for(access_key, credentials)
    if not query["Expires"].isdigit():
        raise _access_denied("Invalid argument.")
    if now.timestamp() > int(query["Expires"]):
        raise _access_denied("Request has expired.")
    signed_params = {name: value for name, value in incoming.query
                     if name not in ("OSSAccessKeyId", "Expires", "Signature")}
    request = _sdk_request(incoming, signed_params)
    # In a presigned URL, Expires takes the place of Date in the string to sign.
    request.headers["date"] = query["Expires"]
    request.headers.pop("x-oss-date", None)
    expected, string_to_sign = v1_signature(request, bucket, key, access_key, secret_key)
    if not hmac.compare_digest(expected, query["Signature"]):
        raise _signature_mismatch(access_key, query["Signature"], string_to_sign)


def _authenticate_v4(incoming: _Incoming, bucket: str | None, key: str | None, field_text: str,
                     credentials: dict[str, str], region: str, now: dt.datetime) -> None:
    fields = {}
    for part in field_text.split(","):
        name, separator, value = part.strip().partition("=")
        if not separator:
            raise _invalid_argument("Authorization header is invalid.", "Authorization", field_text)
        fields[name] = value
    if not {"Credential", "Signature"} <= fields.keys():
        raise _invalid_argument("Authorization header is invalid.", "Authorization", field_text)
    scope = fields["Credential"].split("/")
    if len(scope) != 5:
        raise _invalid_argument("Invalid credential in Authorization header.", "Credential",
                                fields["Credential"])
    access_key, scope_date, scope_region, product, terminator = scope
    secret_key = _secret_for(access_key, credentials)
    timestamp = incoming.headers.get("x-oss-date")
    try:
        request_time = dt.datetime.strptime(timestamp or "", _V4_TIME_FORMAT).replace(tzinfo=dt.UTC)
    except ValueError:
        raise _access_denied("OSS authentication requires a valid Date.") from None
    _check_skew(request_time, now)
    if scope_date != timestamp[:8] or scope_region != region or product != "oss" \
            or terminator != "aliyun_v4_request":
        raise _invalid_argument("Invalid credential in Authorization header.", "Credential",
                                fields["Credential"])
    if incoming.headers.get("x-oss-content-sha256") != _UNSIGNED_PAYLOAD:
        raise _invalid_argument("x-oss-content-sha256 must be UNSIGNED-PAYLOAD.",
                                "x-oss-content-sha256", incoming.headers.get("x-oss-content-sha256"))
    additional = fields["AdditionalHeaders"].split(";") if "AdditionalHeaders" in fields else []
    if any(not name or name not in {key.lower() for key in incoming.headers.keys()}
           for name in additional):
        raise _invalid_argument("Invalid AdditionalHeaders in Authorization header.",
                                "AdditionalHeaders", fields.get("AdditionalHeaders"))
    request = _sdk_request(incoming, dict(incoming.query), region=region, product="oss")
    expected = v4_signature(request, bucket, key, access_key, secret_key, additional, timestamp)
    if not hmac.compare_digest(expected, fields["Signature"]):
        raise OssError(403, "SignatureDoesNotMatch", "The request signature we calculated does "
                       "not match the signature you provided. Check your key and signing method.",
                       {"OSSAccessKeyId": access_key, "SignatureProvided": fields["Signature"]})


# --- stored state ---------------------------------------------------------------------

@dataclass(frozen=True)
class StoredObject:
    """An object as held at rest. `data_on_disk` is ciphertext: never the plaintext."""

    data_on_disk: bytes
    segment_sizes: tuple[int, ...]  # data_on_disk is these independently sealed segments
    server_side_encryption: str | None  # "AES256", "KMS", "SM4", or None when none was asked for
    kms_key_id: str | None
    size: int  # plaintext length
    etag: str  # quoted, as in the ETag header
    crc64: int  # CRC-64/ECMA of the plaintext
    object_type: str  # Normal, Multipart or Appendable
    metadata: dict[str, str]  # user metadata, names without the x-oss-meta- prefix
    content_type: str
    content_headers: tuple[tuple[str, str], ...]
    last_modified: dt.datetime


@dataclass(frozen=True)
class _Encryption:
    algorithm: str | None
    kms_key_id: str | None

    def headers(self) -> list[tuple[str, str]]:
        if self.algorithm is None:
            return []
        headers = [(_SSE, self.algorithm)]
        if self.kms_key_id is not None:
            headers.append((_SSE_KEY_ID, self.kms_key_id))
        return headers


_NOT_ENCRYPTED = _Encryption(None, None)


@dataclass(frozen=True)
class _Part:
    sealed: bytes
    size: int
    etag: str
    md5: bytes
    plaintext_crc: int


@dataclass
class _Upload:
    upload_id: str
    bucket: str
    key: str
    encryption: _Encryption
    metadata: dict[str, str]
    content_type: str
    content_headers: tuple[tuple[str, str], ...]
    parts: dict[int, _Part] = field(default_factory=dict)


@dataclass
class _Bucket:
    name: str
    created: dt.datetime
    objects: dict[str, StoredObject] = field(default_factory=dict)


def _etag(md5: bytes, suffix: str = "") -> str:
    return f'"{md5.hex().upper()}{suffix}"'


class _Store:
    def __init__(self, credentials: dict[str, str], region: str):
        self.credentials = credentials
        self.region = region
        self.lock = threading.Lock()
        self.buckets: dict[str, _Bucket] = {}
        self.uploads: dict[str, _Upload] = {}
        self._server_key = AESGCM.generate_key(256)
        # OSS creates a default KMS key per region the first time SSE-KMS is used without an id.
        self.default_kms_key_id = str(uuid.uuid4())

    def add_bucket(self, name: str) -> bool:
        with self.lock:
            if name in self.buckets:
                return False
            self.buckets[name] = _Bucket(name, utc_now())
            return True

    def seal(self, data: bytes) -> bytes:
        return seal(self._server_key, data)

    def unseal_segments(self, segments: list[bytes]) -> bytes:
        return b"".join(unseal(self._server_key, segment) for segment in segments)

    def plaintext(self, obj: StoredObject) -> bytes:
        segments, offset = [], 0
        for size in obj.segment_sizes:
            segments.append(obj.data_on_disk[offset:offset + size])
            offset += size
        return self.unseal_segments(segments)

    def new_object(self, data: bytes, encryption: _Encryption, *, metadata: dict[str, str],
                   content_type: str, content_headers: tuple[tuple[str, str], ...]) -> StoredObject:
        sealed = self.seal(data)
        return StoredObject(
            data_on_disk=sealed, segment_sizes=(len(sealed),),
            server_side_encryption=encryption.algorithm, kms_key_id=encryption.kms_key_id,
            size=len(data), etag=_etag(hashlib.md5(data).digest()), crc64=crc64ecma(data),
            object_type="Normal", metadata=metadata, content_type=content_type,
            content_headers=content_headers, last_modified=utc_now())

    def handle(self, incoming: _Incoming, read_body: Callable[[], bytes]) -> Response:
        bucket, key = _address(incoming)
        _authenticate(incoming, bucket, key, self.credentials, self.region, dt.datetime.now(dt.UTC))
        level = "object" if key else "bucket" if bucket else "service"
        selector = frozenset(name for name, _ in incoming.query if name in _OPERATION_PARAMS)
        operation = _OPERATIONS.get((incoming.method, level, selector))
        if operation is None:
            raise _not_implemented("This operation is not implemented by the test upstream.")
        unmodelled = [name for name in _UNMODELLED_SSE_HEADERS if name in incoming.headers]
        if unmodelled:
            raise OssError(400, "NotImplemented", "A header you provided implies functionality that "
                           "is not implemented.", {"Header": unmodelled[0]})
        if incoming.headers.get(_SSE) is not None and operation not in _SSE_OPERATIONS:
            raise _invalid_argument(f"{_SSE} is not supported for this operation.", _SSE,
                                    incoming.headers.get(_SSE))
        body = read_body()
        _check_content_md5(incoming.headers.get("Content-MD5"), body)
        return operation(_Call(self, incoming, bucket, key, body))


def _check_content_md5(claimed: str | None, body: bytes) -> None:
    if claimed is None:
        return
    try:
        digest = base64.b64decode(claimed, validate=True)
    except ValueError:
        digest = b""
    if len(digest) != 16 or digest != hashlib.md5(body).digest():
        raise OssError(400, "InvalidDigest", "The Content-MD5 you specified was invalid.")


# --- requests and responses -----------------------------------------------------------

@dataclass(frozen=True)
class _Incoming:
    method: str
    raw_path: str  # still percent-encoded
    query: list[tuple[str, str]]  # decoded, in order
    headers: Message


def _address(incoming: _Incoming) -> tuple[str | None, str | None]:
    """(bucket, key): path style for IP or localhost endpoints (as oss2 sends), else virtual-hosted."""
    return bucket_and_key(incoming.headers.get("Host", ""), incoming.raw_path)


def _error_body(error: OssError, request_id: str, host: str) -> bytes:
    root = xml_element("Error", None, xml_element("Code", error.code), xml_element("Message", error.message),
                       xml_element("RequestId", request_id), xml_element("HostId", host))
    root.extend(xml_element(name, value) for name, value in error.details.items())
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _user_metadata(headers: Message) -> dict[str, str]:
    return {name.lower().removeprefix("x-oss-meta-"): value for name, value in headers.items()
            if name.lower().startswith("x-oss-meta-")}


def _content_headers(headers: Message) -> tuple[tuple[str, str], ...]:
    return tuple((name, headers[name]) for name in _STORED_CONTENT_HEADERS if headers.get(name) is not None)


@dataclass
class _Call(CallParameters):
    """One authenticated request, routed to an operation."""

    store: _Store
    incoming: _Incoming
    bucket_name: str | None
    key: str | None
    body: bytes

    def bucket(self, name: str | None = None) -> _Bucket:
        name = name or self.bucket_name
        bucket = self.store.buckets.get(name)
        if bucket is None:
            raise OssError(404, "NoSuchBucket", "The specified bucket does not exist.", {"BucketName": name})
        return bucket

    def object(self, bucket_name: str | None = None, key: str | None = None) -> StoredObject:
        bucket = self.bucket(bucket_name)
        obj = bucket.objects.get(key or self.key)
        if obj is None:
            raise OssError(404, "NoSuchKey", "The specified key does not exist.", {"Key": key or self.key})
        return obj

    def upload(self) -> _Upload:
        self.bucket()
        upload_id = self.params["uploadId"]
        upload = self.store.uploads.get(upload_id)
        if upload is None or (upload.bucket, upload.key) != (self.bucket_name, self.key):
            raise OssError(404, "NoSuchUpload", "The specified upload does not exist. The upload ID "
                           "may be invalid, or the upload may have been aborted or completed.",
                           {"UploadId": upload_id})
        return upload

    def requested_encryption(self) -> _Encryption:
        """The server-side encryption this write asks for (x-oss-server-side-encryption[-key-id])."""
        algorithm = self.header(_SSE)
        key_id = self.header(_SSE_KEY_ID)
        if algorithm is None:
            if key_id is not None:
                raise _invalid_argument(f"{_SSE_KEY_ID} requires {_SSE}: KMS.", _SSE_KEY_ID, key_id)
            return _NOT_ENCRYPTED
        if algorithm not in _SSE_ALGORITHMS:
            raise OssError(400, "InvalidEncryptionAlgorithmError", "The Encryption request you "
                           "specified is not valid. Supported value: AES256/KMS/SM4",
                           {"ArgumentName": _SSE, "ArgumentValue": algorithm})
        if algorithm != "KMS":
            if key_id is not None:
                raise _invalid_argument(f"{_SSE_KEY_ID} is only valid with {_SSE}: KMS.",
                                        _SSE_KEY_ID, key_id)
            return _Encryption(algorithm, None)
        if key_id == "":
            raise _invalid_argument(f"{_SSE_KEY_ID} must not be empty.", _SSE_KEY_ID, key_id)
        return _Encryption("KMS", key_id or self.store.default_kms_key_id)

    def content_type(self) -> str:
        return self.header("Content-Type") or "application/octet-stream"


# --- operations -----------------------------------------------------------------------

def _object_headers(obj: StoredObject) -> list[tuple[str, str]]:
    return [("ETag", obj.etag), ("Last-Modified", http_date(obj.last_modified)),
            ("x-oss-object-type", obj.object_type), ("x-oss-storage-class", "Standard"),
            ("x-oss-hash-crc64ecma", str(obj.crc64)),
            *_Encryption(obj.server_side_encryption, obj.kms_key_id).headers()]


def _put_bucket(call: _Call) -> Response:
    if call.body:
        parse_xml(call.body, "CreateBucketConfiguration", _malformed_xml)
    if not call.store.add_bucket(call.bucket_name):
        raise OssError(409, "BucketAlreadyExists", "The requested bucket name is not available. "
                       "The bucket namespace is shared by all users of the system. Please select "
                       "a different name and try again.", {"BucketName": call.bucket_name})
    return Response(200, [("Location", f"/{call.bucket_name}")])


def _list_objects(call: _Call) -> Response:
    bucket = call.bucket()
    params = call.params
    prefix, marker, delimiter = params.get("prefix", ""), params.get("marker", ""), params.get("delimiter", "")
    max_keys_text = params.get("max-keys", "100")
    if not max_keys_text.isdigit() or not 1 <= int(max_keys_text) <= 1000:
        raise _invalid_argument("Argument max-keys must be an integer between 1 and 1000.",
                                "max-keys", max_keys_text)
    max_keys = int(max_keys_text)
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
        elif (common := name[:cut + len(delimiter)]) > marker and common not in seen_prefixes:
            seen_prefixes.add(common)
            entries.append((common, None))
    page = entries[:max_keys]
    truncated = len(entries) > max_keys
    root = xml_element("ListBucketResult", None, xml_element("Name", bucket.name), xml_element("Prefix", prefix),
                       xml_element("Marker", marker), xml_element("MaxKeys", max_keys),
                       xml_element("Delimiter", delimiter), xml_element("IsTruncated", str(truncated).lower()))
    if truncated:
        root.append(xml_element("NextMarker", page[-1][0]))
    for name, obj in page:
        if obj is None:
            root.append(xml_element("CommonPrefixes", None, xml_element("Prefix", name)))
        else:
            root.append(xml_element("Contents", None, xml_element("Key", name),
                                    xml_element("LastModified", iso_date(obj.last_modified)),
                                    xml_element("ETag", obj.etag), xml_element("Type", obj.object_type),
                                    xml_element("Size", obj.size), xml_element("StorageClass", "Standard")))
    return xml_response(root)


def _put_object(call: _Call) -> Response:
    if call.header("x-oss-copy-source") is not None:
        return _copy_object(call)
    bucket = call.bucket()
    obj = call.store.new_object(call.body, call.requested_encryption(),
                                metadata=_user_metadata(call.incoming.headers),
                                content_type=call.content_type(),
                                content_headers=_content_headers(call.incoming.headers))
    with call.store.lock:
        bucket.objects[call.key] = obj
    return Response(200, [("ETag", obj.etag), ("x-oss-hash-crc64ecma", str(obj.crc64)),
                          ("Content-MD5", base64.b64encode(hashlib.md5(call.body).digest()).decode()),
                          *_Encryption(obj.server_side_encryption, obj.kms_key_id).headers()])


def _copy_object(call: _Call) -> Response:
    bucket = call.bucket()
    encryption = call.requested_encryption()
    source_bucket, _, source_key = unquote(call.header("x-oss-copy-source")).lstrip("/").partition("/")
    if not source_bucket or not source_key:
        raise _invalid_argument("Copy Source must mention the source bucket and key: "
                                "/sourcebucket/sourcekey.", "x-oss-copy-source",
                                call.header("x-oss-copy-source"))
    source = call.object(source_bucket, source_key)
    if source.object_type == "Appendable":
        raise _invalid_argument("The source object is an appendable object, which cannot be copied.",
                                "x-oss-copy-source", call.header("x-oss-copy-source"))
    directive = call.header("x-oss-metadata-directive") or "COPY"
    if directive not in ("COPY", "REPLACE"):
        raise _invalid_argument("Unknown metadata directive.", "x-oss-metadata-directive", directive)
    if directive == "COPY":
        metadata, content_type, content_headers = source.metadata, source.content_type, source.content_headers
    else:
        metadata = _user_metadata(call.incoming.headers)
        content_type, content_headers = call.content_type(), _content_headers(call.incoming.headers)
    # The copy is encrypted only as this request asks, whatever the source was stored with.
    obj = call.store.new_object(call.store.plaintext(source), encryption, metadata=metadata,
                                content_type=content_type, content_headers=content_headers)
    with call.store.lock:
        bucket.objects[call.key] = obj
    return xml_response(
        xml_element("CopyObjectResult", None, xml_element("ETag", obj.etag),
                    xml_element("LastModified", iso_date(obj.last_modified))),
        [("ETag", obj.etag), ("x-oss-hash-crc64ecma", str(obj.crc64)), *encryption.headers()])


def _get_object(call: _Call) -> Response:
    return _object_response(call, include_body=True)


def _head_object(call: _Call) -> Response:
    return _object_response(call, include_body=False)


def _object_response(call: _Call, include_body: bool) -> Response:
    obj = call.object()
    headers = [*_object_headers(obj), ("Content-Type", obj.content_type), ("Accept-Ranges", "bytes"),
               *obj.content_headers, *((f"x-oss-meta-{name}", value) for name, value in obj.metadata.items())]
    if obj.object_type == "Appendable":
        headers.append(("x-oss-next-append-position", str(obj.size)))
    byte_range = _byte_range(call.header("Range"), obj.size,
                             standard=call.header("x-oss-range-behavior") == "standard")
    if byte_range is None:
        status, (first, last) = 200, (0, obj.size - 1)
    else:
        status, (first, last) = 206, byte_range
        headers.append(("Content-Range", f"bytes {first}-{last}/{obj.size}"))
    headers.append(("Content-Length", str(last - first + 1)))
    body = call.store.plaintext(obj)[first:last + 1] if include_body else b""
    return Response(status, headers, body)


def _byte_range(header: str | None, size: int, *, standard: bool) -> tuple[int, int] | None:
    """(first, last) of a single `bytes=` range; None when OSS serves the whole object instead.

    By default OSS ignores a range that reaches outside the object. With
    x-oss-range-behavior: standard it follows RFC 7233: the end is clipped to the object,
    and a start beyond it gets 416.
    """
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    first_text, dash, last_text = spec.strip().partition("-")
    if unit.strip() != "bytes" or not dash or not (first_text + last_text).isdigit():
        return None
    if first_text:
        first = int(first_text)
        last = int(last_text) if last_text else size - 1
        if last < first:
            return None
    else:
        suffix = int(last_text)
        if suffix == 0 or (suffix > size and not standard):
            return None
        first, last = max(size - suffix, 0), size - 1
    if first >= size:
        if not standard:
            return None
        raise OssError(416, "InvalidRange", "The requested range cannot be satisfied.",
                       {"RangeRequested": header, "ActualObjectSize": str(size)})
    if last >= size:
        if not standard:
            return None
        last = size - 1
    return first, last


def _get_object_meta(call: _Call) -> Response:
    obj = call.object()
    return Response(200, [("ETag", obj.etag), ("Last-Modified", http_date(obj.last_modified)),
                          ("Content-Length", str(obj.size)), ("x-oss-hash-crc64ecma", str(obj.crc64))])


def _delete_object(call: _Call) -> Response:
    bucket = call.bucket()
    with call.store.lock:
        bucket.objects.pop(call.key, None)
    return Response(204)


def _append_object(call: _Call) -> Response:
    bucket = call.bucket()
    position_text = call.params.get("position")
    if position_text is None or not position_text.isdigit():
        raise _invalid_argument("Position is not valid.", "position", position_text)
    position = int(position_text)
    with call.store.lock:
        existing = bucket.objects.get(call.key)
        if existing is not None and existing.object_type != "Appendable":
            raise OssError(409, "ObjectNotAppendable", "The object is not appendable")
        if position != (existing.size if existing else 0):
            raise OssError(409, "PositionNotEqualToLength", "Position is not equal to file length",
                           {"CurrentLength": str(existing.size if existing else 0)})
        if existing is None:
            encryption = call.requested_encryption()
            if call.header(_SSE_KEY_ID) is not None:
                raise _invalid_argument("Appendable objects cannot be encrypted with a specified "
                                        "KMS key id.", _SSE_KEY_ID, call.header(_SSE_KEY_ID))
            data, sealed, segments = call.body, b"", ()
            metadata, content_type = _user_metadata(call.incoming.headers), call.content_type()
            content_headers = _content_headers(call.incoming.headers)
        else:
            # Later appends keep what the first append chose; asking for something else is an error.
            encryption = _Encryption(existing.server_side_encryption, existing.kms_key_id)
            requested = call.header(_SSE)
            if requested is not None and requested != existing.server_side_encryption:
                raise _invalid_argument("The encryption of an appendable object is set by its first "
                                        "append.", _SSE, requested)
            data = call.store.plaintext(existing) + call.body
            sealed, segments = existing.data_on_disk, existing.segment_sizes
            metadata, content_type = existing.metadata, existing.content_type
            content_headers = existing.content_headers
        segment = call.store.seal(call.body)
        obj = StoredObject(
            data_on_disk=sealed + segment, segment_sizes=(*segments, len(segment)),
            server_side_encryption=encryption.algorithm, kms_key_id=encryption.kms_key_id,
            size=len(data), etag=_etag(hashlib.md5(data).digest()), crc64=crc64ecma(data),
            object_type="Appendable", metadata=metadata, content_type=content_type,
            content_headers=content_headers, last_modified=utc_now())
        bucket.objects[call.key] = obj
    return Response(200, [("ETag", obj.etag), ("x-oss-next-append-position", str(obj.size)),
                          ("x-oss-hash-crc64ecma", str(obj.crc64)), *encryption.headers()])


def _initiate_multipart_upload(call: _Call) -> Response:
    bucket = call.bucket()
    upload = _Upload(upload_id=secrets.token_hex(16).upper(), bucket=bucket.name, key=call.key,
                     encryption=call.requested_encryption(),
                     metadata=_user_metadata(call.incoming.headers), content_type=call.content_type(),
                     content_headers=_content_headers(call.incoming.headers))
    with call.store.lock:
        call.store.uploads[upload.upload_id] = upload
    return xml_response(xml_element("InitiateMultipartUploadResult", None, xml_element("Bucket", bucket.name),
                                    xml_element("Key", call.key), xml_element("UploadId", upload.upload_id)),
                        upload.encryption.headers())


def _upload_part(call: _Call) -> Response:
    upload = call.upload()
    number_text = call.params.get("partNumber", "")
    if not number_text.isdigit() or not 1 <= int(number_text) <= _MAX_PART_NUMBER:
        raise _invalid_argument(f"Part number must be an integer between 1 and {_MAX_PART_NUMBER}, "
                                "inclusive.", "partNumber", number_text)
    md5 = hashlib.md5(call.body).digest()
    part = _Part(sealed=call.store.seal(call.body), size=len(call.body), etag=_etag(md5), md5=md5,
                 plaintext_crc=crc64ecma(call.body))
    with call.store.lock:
        upload.parts[int(number_text)] = part
    # Parts are encrypted as the upload was initiated, and say so.
    return Response(200, [("ETag", part.etag), ("x-oss-hash-crc64ecma", str(part.plaintext_crc)),
                          *upload.encryption.headers()])


def _complete_multipart_upload(call: _Call) -> Response:
    upload = call.upload()
    listed = xml_children(parse_xml(call.body, "CompleteMultipartUpload", _malformed_xml), "Part")
    if not listed:
        raise _malformed_xml()
    numbers, parts = [], []
    for entry in listed:
        number_text, etag = xml_child_text(entry, "PartNumber"), xml_child_text(entry, "ETag")
        if number_text is None or not number_text.isdigit() or etag is None:
            raise _malformed_xml()
        number = int(number_text)
        if numbers and number <= numbers[-1]:
            raise OssError(400, "InvalidPartOrder", "The list of parts was not in ascending order. "
                           "Parts list must specified in order by part number.")
        part = upload.parts.get(number)
        if part is None or part.etag.strip('"') != etag.strip().strip('"').upper():
            raise OssError(400, "InvalidPart", "One or more of the specified parts could not be "
                           "found or the specified entity tag might not have matched the part's "
                           "entity tag.", {"UploadId": upload.upload_id, "PartNumber": str(number)})
        numbers.append(number)
        parts.append(part)
    for number, part in zip(numbers[:-1], parts[:-1]):
        if part.size < _MIN_PART_SIZE:
            raise OssError(400, "EntityTooSmall", "Your proposed upload smaller than the minimum "
                           "allowed size.", {"MinSizeAllowed": str(_MIN_PART_SIZE),
                                             "ProposedSize": str(part.size), "PartNumber": str(number)})
    obj = StoredObject(
        data_on_disk=b"".join(part.sealed for part in parts), segment_sizes=tuple(len(part.sealed) for part in parts),
        server_side_encryption=upload.encryption.algorithm, kms_key_id=upload.encryption.kms_key_id,
        size=sum(part.size for part in parts),
        etag=_etag(hashlib.md5(b"".join(part.md5 for part in parts)).digest(), f"-{len(parts)}"),
        # The CRC of the whole object, computed over its plaintext as a client would.
        crc64=crc64ecma(call.store.unseal_segments([part.sealed for part in parts])), object_type="Multipart", metadata=upload.metadata, content_type=upload.content_type,
        content_headers=upload.content_headers, last_modified=utc_now())
    bucket = call.bucket()
    with call.store.lock:
        call.store.uploads.pop(upload.upload_id, None)
        bucket.objects[call.key] = obj
    return xml_response(
        xml_element("CompleteMultipartUploadResult", None,
                    xml_element("Location", f"{bucket.name}/{call.key}"), xml_element("Bucket", bucket.name),
                    xml_element("Key", call.key), xml_element("ETag", obj.etag)),
        [("ETag", obj.etag), ("x-oss-hash-crc64ecma", str(obj.crc64)), *upload.encryption.headers()])


def _abort_multipart_upload(call: _Call) -> Response:
    upload = call.upload()
    with call.store.lock:
        call.store.uploads.pop(upload.upload_id, None)
    return Response(204)


_OPERATIONS: dict[tuple[str, str, frozenset[str]], Callable[[_Call], Response]] = {
    ("PUT", "bucket", frozenset()): _put_bucket,
    ("GET", "bucket", frozenset()): _list_objects,
    ("PUT", "object", frozenset()): _put_object,
    ("GET", "object", frozenset()): _get_object,
    ("HEAD", "object", frozenset()): _head_object,
    ("HEAD", "object", frozenset({"objectMeta"})): _get_object_meta,
    ("GET", "object", frozenset({"objectMeta"})): _get_object_meta,
    ("DELETE", "object", frozenset()): _delete_object,
    ("POST", "object", frozenset({"append"})): _append_object,
    ("POST", "object", frozenset({"uploads"})): _initiate_multipart_upload,
    ("PUT", "object", frozenset({"uploadId"})): _upload_part,
    ("POST", "object", frozenset({"uploadId"})): _complete_multipart_upload,
    ("DELETE", "object", frozenset({"uploadId"})): _abort_multipart_upload,
}
# The operations OSS accepts x-oss-server-side-encryption on (PostObject is not implemented).
_SSE_OPERATIONS = frozenset({_put_object, _initiate_multipart_upload, _append_object})


# --- HTTP -----------------------------------------------------------------------------

class _Handler(StorageHandler):
    server_version = "AliyunOSS"

    def _serve(self):
        upstream: OssUpstream = self.server.owner
        raw_path, _, query, record = self.receive()
        request_id = secrets.token_hex(12).upper()
        incoming = _Incoming(self.command, raw_path, query, self.headers)
        try:
            response = upstream._store.handle(incoming, self._read_body)
        except OssError as error:
            response = self._error_response(error, request_id)
        except Exception:
            upstream.internal_errors.append(traceback.format_exc())
            response = self._error_response(
                OssError(500, "InternalError", "We encountered an internal error. Please try again."),
                request_id)
        record.status = response.status
        self._send(response, request_id)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

    def _error_response(self, error: OssError, request_id: str) -> Response:
        # HostId is the host the client addressed.
        body = _error_body(error, request_id, self.headers.get("Host", ""))
        headers = [("Content-Type", "application/xml")]
        if self.command == "HEAD":
            # A HEAD answer has no body, so OSS carries the error document in x-oss-err.
            headers.append(("x-oss-err", base64.b64encode(body).decode()))
        return Response(error.status, headers, body)

    def _read_body(self) -> bytes:
        self._body_consumed = True
        transfer_encoding = self.headers.get("Transfer-Encoding")
        if transfer_encoding is not None:
            if transfer_encoding.strip().lower() != "chunked":
                raise _not_implemented()
            # OSS accepts chunked transfer in place of Content-Length.
            return self.read_http_chunked(_incomplete_body)
        length = self.headers.get("Content-Length")
        if length is None:
            if self.command == "PUT":
                raise OssError(411, "MissingContentLength", "You must provide the Content-Length "
                               "HTTP header.")
            return b""
        if not length.isdigit():
            raise _invalid_argument("Content-Length is invalid.", "Content-Length", length)
        body = self.rfile.read(int(length))
        if len(body) != int(length):
            raise _incomplete_body()
        return body

    def _send(self, response: Response, request_id: str):
        if self.body_left_unread():
            # The body was never read: this connection cannot carry another request.
            self.close_after_response(response.headers)
        self.write_response(response.status, [("x-oss-request-id", request_id), *response.headers],
                            response.body, without_length=(204,))


class OssUpstream(StorageUpstream):
    """A strict Alibaba Cloud OSS server on 127.0.0.1, for driving real OSS clients in tests."""

    handler = _Handler
    thread_name = "oss-upstream"

    def __init__(self, ca: trustme.CA | None, credentials: dict[str, str], *,
                 region: str = "cn-hangzhou", tls: bool = True):
        super().__init__(ca, tls=tls)
        self.region = region
        self._store = _Store(dict(credentials), region)

    @property
    def default_kms_key_id(self) -> str:
        """The key id recorded for SSE-KMS objects written without x-oss-server-side-encryption-key-id."""
        return self._store.default_kms_key_id

    def create_bucket(self, name: str) -> None:
        if not self._store.add_bucket(name):
            raise ValueError(f"bucket {name!r} already exists")

    def stored(self, bucket: str, key: str) -> StoredObject:
        with self._store.lock:
            return self._store.buckets[bucket].objects[key]

    def stored_bytes(self, bucket: str, key: str) -> bytes:
        """The object's bytes exactly as clients sent them (its at-rest sealing opened): for an object
        encrypted on the client side, the ciphertext."""
        return self._store.plaintext(self.stored(bucket, key))
