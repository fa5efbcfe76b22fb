"""Amazon S3: which request is which operation, and the SSE-C headers (docs/s3.md)."""
from __future__ import annotations

import re

from keycourier.dialects import (OTHER_OPERATION, Encryption, Operation, copy_source_ref,
                             name_s3_style_operation, s3_style_location, parse_customer_key, xml_error_body)
from keycourier.keys import Key
from keycourier.message import Request

PROVIDER = "s3"
CUSTOMER_KEYS = True  # SSE-C: the request carries the key itself

SSE_C_PREFIX = "x-amz-server-side-encryption-customer-"
COPY_SOURCE_SSE_C_PREFIX = "x-amz-copy-source-server-side-encryption-customer-"
SECRET_HEADERS = (SSE_C_PREFIX + "key", COPY_SOURCE_SSE_C_PREFIX + "key")

# Operations that accept SSE-C key headers (S3 API reference, each operation's request headers).
KEY_OPERATIONS = frozenset({
    "PutObject", "GetObject", "HeadObject", "CreateMultipartUpload", "UploadPart", "UploadPartCopy",
    "CopyObject", "GetObjectAttributes", "SelectObjectContent",
})
COPY_OPERATIONS = frozenset({"CopyObject", "UploadPartCopy"})
SOURCE_KEY_OPERATIONS = COPY_OPERATIONS
WRITE_OPERATIONS = frozenset({"PutObject", "CreateMultipartUpload", "UploadPart", "UploadPartCopy", "CopyObject"})

# <bucket>.s3[.-<region>|.dualstack|-accelerate...].amazonaws.com[.cn]
_VIRTUAL_HOSTED = re.compile(r"^(?P<bucket>.+)\.s3(?:[.-][a-z0-9-]+)*\.amazonaws\.com(?:\.cn)?$", re.IGNORECASE)
# s3[.-<region>...].amazonaws.com[.cn]: AWS's own service host, addressed path-style.
_AWS_SERVICE_HOST = re.compile(r"^s3(?:[.-][a-z0-9-]+)*\.amazonaws\.com(?:\.cn)?$", re.IGNORECASE)

# s3.<region>.amazonaws.com, s3-<region>.amazonaws.com, s3.dualstack.<region>.amazonaws.com
_REGION_IN_HOST = re.compile(r"\.?s3[.-](?:dualstack\.)?(?P<region>[a-z]{2}(?:-[a-z]+)+-\d)\.amazonaws\.com(?:\.cn)?$")
DEFAULT_REGION = "us-east-1"

# Object sub-resources that name another operation than the plain verb does, by method.
_OBJECT_SUBRESOURCES = {
    "GET": {"uploadId": "ListParts", "attributes": "GetObjectAttributes", "tagging": "GetObjectTagging",
            "acl": "GetObjectAcl", "retention": "GetObjectRetention", "legal-hold": "GetObjectLegalHold",
            "torrent": "GetObjectTorrent"},
    "PUT": {"tagging": "PutObjectTagging", "acl": "PutObjectAcl", "retention": "PutObjectRetention",
            "legal-hold": "PutObjectLegalHold"},
    "POST": {"uploads": "CreateMultipartUpload", "uploadId": "CompleteMultipartUpload",
             "select": "SelectObjectContent", "restore": "RestoreObject"},
    "DELETE": {"uploadId": "AbortMultipartUpload", "tagging": "DeleteObjectTagging"},
}
_OBJECT_VERBS = {"GET": "GetObject", "HEAD": "HeadObject", "PUT": "PutObject", "DELETE": "DeleteObject"}
_BUCKET_VERBS = {"GET": "ListObjects", "HEAD": "HeadBucket", "PUT": "CreateBucket", "DELETE": "DeleteBucket"}
# Bucket configuration sub-resources, named as in the S3 API (GetBucketVersioning, PutBucketPolicy, ...).
_BUCKET_SUBRESOURCES = {
    "accelerate": "Accelerate", "acl": "Acl", "analytics": "Analytics", "cors": "Cors", "encryption": "Encryption",
    "intelligent-tiering": "IntelligentTiering", "inventory": "Inventory", "lifecycle": "Lifecycle",
    "location": "Location", "logging": "Logging", "metrics": "Metrics", "notification": "Notification",
    "object-lock": "ObjectLock", "ownershipControls": "OwnershipControls", "policy": "Policy",
    "policyStatus": "PolicyStatus", "publicAccessBlock": "PublicAccessBlock", "replication": "Replication",
    "requestPayment": "RequestPayment", "tagging": "Tagging", "versioning": "Versioning", "website": "Website",
}
# Browser form uploads (POST to a bucket) carry their headers as form fields keycourier does not
# rewrite: refused under encrypt rules, like any object operation keycourier cannot name.
UNENCRYPTABLE_WRITES = frozenset({"PostObject"})
# Name their objects in the body: judged by the strictest rule those objects can fall under.
# Operations on an existing object that need the key it was written with: after a key rotation they may need
# an older version (the copy operations need their source's, see SOURCE_KEY_OPERATIONS).
FALLBACK_READS = frozenset({"GetObject", "HeadObject", "GetObjectAttributes"})
# Reads whose answer is the object itself (the application's own bytes).
DATA_READS = frozenset({"GetObject", "SelectObjectContent"})
BULK_OPERATIONS = frozenset({"DeleteObjects"})


def classify(request: Request, endpoint_host: str = "") -> Operation:
    """`endpoint_host` is the policy endpoint's host glob: `*.<domain>` there means buckets may be
    addressed virtual-hosted under <domain>, as boto3 does by default for custom endpoint names."""
    bucket, object_key = s3_style_location(request, endpoint_host, _AWS_SERVICE_HOST, _VIRTUAL_HOSTED)
    name = name_s3_style_operation(request, bucket, object_key, _bucket_operation, _object_operation)
    copy_source = copy_source_ref(request, "x-amz-copy-source") if name in COPY_OPERATIONS else None
    return Operation(PROVIDER, name, bucket, object_key, copy_source, accepts_encryption=name in KEY_OPERATIONS)


def _bucket_operation(method: str, params: set[str]) -> str:
    if method == "POST" and "delete" in params:
        return "DeleteObjects"
    if method == "POST" and not params:
        return "PostObject"
    if method == "GET" and "uploads" in params:
        return "ListMultipartUploads"
    if method == "GET" and "versions" in params:
        return "ListObjectVersions"
    if method == "GET" and params & {"list-type"}:
        return "ListObjectsV2"
    configured = sorted(params & _BUCKET_SUBRESOURCES.keys())
    if configured and method in ("GET", "PUT", "DELETE"):
        return f"{method.title()}Bucket{_BUCKET_SUBRESOURCES[configured[0]]}"
    return _BUCKET_VERBS.get(method, OTHER_OPERATION)


def _object_operation(method: str, params: set[str], request: Request) -> str:
    for param, name in _OBJECT_SUBRESOURCES.get(method, {}).items():
        if param in params:
            return name
    if method == "PUT" and "partNumber" in params and "uploadId" in params:
        return "UploadPartCopy" if request.header("x-amz-copy-source") else "UploadPart"
    if method == "PUT" and request.header("x-amz-copy-source"):
        return "CopyObject"
    return _OBJECT_VERBS.get(method, OTHER_OPERATION)


def signing_region(request: Request, configured: str | None) -> str:
    """The region to sign for when keycourier signs afresh (SigV2 clients): the policy's, else the host's."""
    if configured:
        return configured
    found = _REGION_IN_HOST.search(request.host)
    return found["region"] if found else DEFAULT_REGION


def client_key_headers(request: Request) -> list[str]:
    """SSE-C headers the client sent itself."""
    return sorted({name.lower() for name, _ in request.headers
                   if name.lower().startswith((SSE_C_PREFIX, COPY_SOURCE_SSE_C_PREFIX))})


def parse_client_key(request: Request) -> Encryption:
    """The keys a client sent in SSE-C headers, to render in another provider's dialect."""
    return Encryption(*(parse_customer_key(request, prefix, prefix + "key-MD5", lambda key: key.md5_b64, "MD5")
                        for prefix in (SSE_C_PREFIX, COPY_SOURCE_SSE_C_PREFIX)))


RESPONSE_KEY_HEADERS = (SSE_C_PREFIX + "algorithm", SSE_C_PREFIX + "key-MD5")


def response_key_headers(md5_b64: str, sha256_b64: str, write: bool) -> dict[str, str]:
    """What S3 answers about the customer key an object was written or read with."""
    return {SSE_C_PREFIX + "algorithm": "AES256", SSE_C_PREFIX + "key-MD5": md5_b64}


def key_fingerprint(key: Key) -> str:
    """What S3 itself sees of the key, safe to log."""
    return key.md5_b64


def render(request: Request, encryption: Encryption) -> tuple[Request, list[str]]:
    """The request with SSE-C headers for the object's key and a copy source's key; the names added."""
    headers: dict[str, str] = {}
    for prefix, given in ((SSE_C_PREFIX, encryption.key), (COPY_SOURCE_SSE_C_PREFIX, encryption.source_key)):
        if given:
            headers[prefix + "algorithm"] = "AES256"
            headers[prefix + "key"] = given.b64
            headers[prefix + "key-MD5"] = given.md5_b64
    return request.with_header_map(headers), [name.lower() for name in headers]


error_body = xml_error_body


def read_outcome(status: int, headers: dict[str, str], body_start: bytes, *, source: bool) -> str:
    """What S3's answer to a request with an object's customer key (a copy's `source` key) says about that
    key (docs/read-errors.md): `wrong_key` (403 with S3's wrong-key message; a HEAD's 403 has no body and a
    copy's says only Access Denied, so those may be denials: the tries are bounded), `plaintext` (400: the
    object is stored without SSE-C), else `served`."""
    if status == 403 and (source or not body_start or b"correct secret key" in body_start):
        return "wrong_key"
    if status == 400 and (not body_start or b"not applicable to this object" in body_start):
        return "plaintext"
    return "served"




def explain_error(status: int, code: str | None, audit) -> str | None:
    """Plain words for S3 refusals whose cause is the bucket's setup, not keycourier (docs/s3.md)."""
    if status == 403 and code == "AccessDenied" and audit.key and audit.operation in WRITE_OPERATIONS:
        return ("S3 denied an SSE-C write. Buckets created since April 2026 block SSE-C by default: "
                "the bucket must allow SSE-C (remove SSE-C from BlockedEncryptionTypes in its default "
                "encryption configuration), or the credentials lack write permission")
    return None
