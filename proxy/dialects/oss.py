"""Alibaba Cloud OSS: which request is which operation, and the server-side encryption header (docs/oss.md).

OSS takes no customer-provided keys: an encrypt rule asks OSS to encrypt with AES256, SM4 or KMS
(`x-oss-server-side-encryption`, with `-key-id` for a KMS key). OSS refuses the header with 400
InvalidArgument on any operation but the ones in ENCRYPTION_OPERATIONS, so it is added there only.
"""
from __future__ import annotations

import re

from keycourier.dialects import (OTHER_OPERATION, Encryption, Operation, copy_source_ref,
                             name_s3_style_operation, s3_style_location, xml_error_body)
from keycourier.message import Request

PROVIDER = "oss"
CUSTOMER_KEYS = False
SSE_HEADER = "x-oss-server-side-encryption"
SSE_KEY_ID_HEADER = "x-oss-server-side-encryption-key-id"
SECRET_HEADERS: tuple[str, ...] = ()  # the SSE headers name an algorithm and a key id, never key material

ENCRYPTION_OPERATIONS = frozenset({"PutObject", "CopyObject", "InitiateMultipartUpload", "AppendObject"})
# PostObject (browser form upload) carries the header as a form field keycourier does not rewrite:
# refused under encrypt rules, like any object operation keycourier cannot name.
UNENCRYPTABLE_WRITES = frozenset({"PostObject"})
# Name their objects in the body: judged by the strictest rule those objects can fall under.
FALLBACK_READS: frozenset[str] = frozenset()  # no customer keys, so no key versions to fall back on
# Reads whose answer is the object itself (the application's own bytes).
DATA_READS = frozenset({"GetObject"})
BULK_OPERATIONS = frozenset({"DeleteMultipleObjects"})
SOURCE_KEY_OPERATIONS: frozenset[str] = frozenset()
RESPONSE_KEY_HEADERS: tuple[str, ...] = ()  # no customer keys, nothing to say about one
WRITE_OPERATIONS = ENCRYPTION_OPERATIONS | {"UploadPart", "UploadPartCopy", "CompleteMultipartUpload"}

# <bucket>.oss-<region>[-internal].aliyuncs.com, <bucket>.oss-accelerate.aliyuncs.com
_VIRTUAL_HOSTED = re.compile(r"^(?P<bucket>[a-z0-9-]+)\.oss-[a-z0-9-]+\.aliyuncs\.com$", re.IGNORECASE)
_SERVICE_HOST = re.compile(r"^oss-[a-z0-9-]+\.aliyuncs\.com$", re.IGNORECASE)

_OBJECT_SUBRESOURCES = {
    "GET": {"uploadId": "ListParts", "acl": "GetObjectACL", "symlink": "GetSymlink", "tagging": "GetObjectTagging"},
    "HEAD": {"objectMeta": "GetObjectMeta"},
    "PUT": {"acl": "PutObjectACL", "symlink": "PutSymlink", "tagging": "PutObjectTagging"},
    "POST": {"uploads": "InitiateMultipartUpload", "uploadId": "CompleteMultipartUpload", "append": "AppendObject",
             "restore": "RestoreObject"},
    "DELETE": {"uploadId": "AbortMultipartUpload", "tagging": "DeleteObjectTagging"},
}
_OBJECT_VERBS = {"GET": "GetObject", "HEAD": "HeadObject", "PUT": "PutObject", "DELETE": "DeleteObject"}
_BUCKET_VERBS = {"GET": "ListObjects", "PUT": "PutBucket", "DELETE": "DeleteBucket", "HEAD": "GetBucketInfo"}


def classify(request: Request, endpoint_host: str = "") -> Operation:
    bucket, object_key = s3_style_location(request, endpoint_host, _SERVICE_HOST, _VIRTUAL_HOSTED)
    name = name_s3_style_operation(request, bucket, object_key, _bucket_operation, _object_operation)
    copy_source = copy_source_ref(request, "x-oss-copy-source") if name in ("CopyObject", "UploadPartCopy") else None
    return Operation(PROVIDER, name, bucket, object_key, copy_source,
                     accepts_encryption=name in ENCRYPTION_OPERATIONS)


def _bucket_operation(method: str, params: set[str]) -> str:
    if method == "POST" and "delete" in params:
        return "DeleteMultipleObjects"
    if method == "POST" and not params:
        return "PostObject"
    if method == "GET" and "uploads" in params:
        return "ListMultipartUploads"
    if params - {"prefix", "marker", "delimiter", "max-keys", "encoding-type", "list-type", "continuation-token",
                 "start-after", "fetch-owner"}:
        return OTHER_OPERATION  # bucket configuration calls: no object data, no encryption header
    return _BUCKET_VERBS.get(method, OTHER_OPERATION)


def _object_operation(method: str, params: set[str], request: Request) -> str:
    if method == "PUT" and {"partNumber", "uploadId"} <= params:
        return "UploadPartCopy" if request.header("x-oss-copy-source") else "UploadPart"
    for param, name in _OBJECT_SUBRESOURCES.get(method, {}).items():
        if param in params:
            return name
    if method == "PUT" and request.header("x-oss-copy-source"):
        return "CopyObject"
    return _OBJECT_VERBS.get(method, OTHER_OPERATION)


def client_key_headers(request: Request) -> list[str]:
    """Encryption headers the client sent itself."""
    return sorted({name.lower() for name, _ in request.headers if name.lower().startswith(SSE_HEADER)})


def render(request: Request, encryption: Encryption) -> tuple[Request, list[str]]:
    """The request with OSS's encryption header for the rule's algorithm (and KMS key id)."""
    if not encryption.managed:
        return request, []
    headers = {SSE_HEADER: encryption.managed}
    if encryption.managed_key_id:
        headers[SSE_KEY_ID_HEADER] = encryption.managed_key_id
    return request.with_header_map(headers), list(headers)


def signing_region(request: Request, configured: str | None) -> str | None:
    """OSS V4 requests keep the client's own scope; V1 has none."""
    return configured


def explain_error(status: int, code: str | None, audit) -> str | None:
    if status == 400 and code == "InvalidEncryptionAlgorithmError":
        return f"OSS refused the rule's oss_sse value for bucket {audit.bucket}"
    return None


error_body = xml_error_body
