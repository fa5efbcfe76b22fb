"""Azure Blob Storage: which request is which operation, and the customer-provided key (CPK) headers
(docs/azure.md). `bucket` in keycourier's model is the container; `account` the storage account."""
from __future__ import annotations

import re
from urllib.parse import urlsplit

from keycourier.dialects import (OTHER_OPERATION, BadRequest, Encryption, ObjectRef, Operation, bucket_in_host,
                             decoded_path, leading_segment, parse_customer_key, xml_error_body)
from keycourier.hostnames import canonical_host
from keycourier.keys import Key
from keycourier.message import Request

PROVIDER = "azure"
CUSTOMER_KEYS = True  # CPK: the request carries the key itself
CPK_PREFIX = "x-ms-encryption-"
SOURCE_CPK_PREFIX = "x-ms-source-encryption-"
CPK_HEADERS = ("key", "key-sha256", "algorithm")
SECRET_HEADERS = (CPK_PREFIX + "key", SOURCE_CPK_PREFIX + "key")

# Operations that take CPK headers (Microsoft: "Blob Storage operations supporting customer-provided keys").
KEY_OPERATIONS = frozenset({
    "PutBlob", "PutBlobFromURL", "PutBlock", "PutBlockFromURL", "PutBlockList", "PutPage", "PutPageFromURL",
    "AppendBlock", "AppendBlockFromURL", "GetBlob", "GetBlobProperties", "GetBlobMetadata", "SetBlobMetadata",
    "SetBlobProperties", "SnapshotBlob",
})
# The *FromURL operations read a CPK source with x-ms-source-encryption-* (service version 2026-02-06+).
SOURCE_KEY_OPERATIONS = frozenset({"PutBlobFromURL", "PutBlockFromURL", "PutPageFromURL", "AppendBlockFromURL"})
# Copy Blob and Copy Blob From URL take no CPK: into an encrypt container they would store the blob
# under Microsoft's keys, so they are refused there (Put Blob From URL does the same job with a key).
UNENCRYPTABLE_WRITES = frozenset({"CopyBlob", "CopyBlobFromURL"})
COPY_OPERATIONS = SOURCE_KEY_OPERATIONS | UNENCRYPTABLE_WRITES
WRITE_OPERATIONS = frozenset({"PutBlob", "PutBlobFromURL", "PutBlock", "PutBlockFromURL", "PutBlockList", "PutPage",
                              "PutPageFromURL", "AppendBlock", "AppendBlockFromURL", "SetBlobMetadata",
                              "SetBlobProperties", "SnapshotBlob"})

# <account>.blob.core.windows.net, and the sovereign clouds' blob.core.<suffix>
_ACCOUNT_HOST = re.compile(r"^(?P<account>[a-z0-9]+)\.blob\.core\.[a-z0-9.]+$", re.IGNORECASE)

_BLOB_COMPS = {
    "PUT": {"blocklist": "PutBlockList", "metadata": "SetBlobMetadata", "properties": "SetBlobProperties",
            "snapshot": "SnapshotBlob", "tier": "SetBlobTier", "lease": "LeaseBlob", "tags": "SetBlobTags",
            "copy": "AbortCopyBlob", "undelete": "UndeleteBlob", "expiry": "SetBlobExpiry",
            "immutabilityPolicy": "SetBlobImmutabilityPolicy", "legalhold": "SetBlobLegalHold"},
    "GET": {"metadata": "GetBlobMetadata", "blocklist": "GetBlockList", "pagelist": "GetPageRanges",
            "tags": "GetBlobTags"},
    "HEAD": {"metadata": "GetBlobMetadata"},
    "DELETE": {"immutabilityPolicy": "DeleteBlobImmutabilityPolicy"},
}
# comp values whose operation reads its data from another blob when x-ms-copy-source is present
_DATA_COMPS = {"block": "PutBlock", "page": "PutPage", "appendblock": "AppendBlock"}
_BLOB_VERBS = {"GET": "GetBlob", "HEAD": "GetBlobProperties", "DELETE": "DeleteBlob"}
_CONTAINER_VERBS = {"PUT": "CreateContainer", "DELETE": "DeleteContainer", "GET": "GetContainerProperties",
                    "HEAD": "GetContainerProperties"}
# Container calls (restype=container) by comp: no blob data in them.
_CONTAINER_COMPS = {
    ("GET", "metadata"): "GetContainerMetadata", ("HEAD", "metadata"): "GetContainerMetadata",
    ("PUT", "metadata"): "SetContainerMetadata", ("GET", "acl"): "GetContainerACL", ("HEAD", "acl"): "GetContainerACL",
    ("PUT", "acl"): "SetContainerACL", ("PUT", "lease"): "LeaseContainer", ("GET", "blobs"): "FindBlobsByTags",
}
# Account calls by (method, comp, restype).
_ACCOUNT_OPERATIONS = {
    ("GET", "list", None): "ListContainers", ("GET", "properties", "service"): "GetBlobServiceProperties",
    ("PUT", "properties", "service"): "SetBlobServiceProperties", ("GET", "stats", "service"): "GetBlobServiceStats",
    ("GET", "properties", "account"): "GetAccountInformation", ("HEAD", "properties", "account"): "GetAccountInformation",
    ("POST", "userdelegationkey", "service"): "GetUserDelegationKey", ("GET", "blobs", None): "FindBlobsByTags",
}
# Operations on an existing blob that need the key it was written with (the *FromURL writes need their source's).
FALLBACK_READS = frozenset({"GetBlob", "GetBlobProperties", "GetBlobMetadata", "SetBlobMetadata", "SetBlobProperties",
                            "SnapshotBlob"})
# Batches name their sub-requests' blobs in the body: judged by the strictest rule those blobs can fall under.
# Reads whose answer is the object itself (the application's own bytes).
DATA_READS = frozenset({"GetBlob"})
BULK_OPERATIONS = frozenset({"SubmitBatch"})


ROOT_CONTAINER = "$root"


def classify(request: Request, endpoint_host: str = "") -> Operation:
    params = dict(request.query)
    where = locate(request.host, request.path, endpoint_host, root_blobs=params.get("restype") != "container"
                   and params.get("comp") not in ("list", "batch"))
    method = request.method.upper()
    if method == "POST" and params.get("comp") == "batch" and where.object_key is None:
        name = "SubmitBatch"
    elif where.bucket is None:
        name = _ACCOUNT_OPERATIONS.get((method, params.get("comp"), params.get("restype")), OTHER_OPERATION)
    elif where.object_key is None:
        name = _container_operation(method, params)
    else:
        name = _blob_operation(method, params, request)
    copy_source = _copy_source(request, endpoint_host) if name in COPY_OPERATIONS else None
    return Operation(PROVIDER, name, where.bucket, where.object_key, copy_source,
                     accepts_encryption=name in KEY_OPERATIONS, account=where.account)


def locate(host: str, raw_path: str, endpoint_host: str, *, root_blobs: bool = True) -> ObjectRef:
    """Account, container and blob: `<account>.blob.core.windows.net/<container>/<blob>`, or the
    emulator's (Azurite's) `host:port/<account>/<container>/<blob>`. With `root_blobs`, a lone name
    is what Azure reads it as: a blob in the root container ($root), not a container."""
    path = decoded_path(raw_path).removeprefix("/")
    found = _ACCOUNT_HOST.match(host)
    account = found["account"] if found else bucket_in_host(host, endpoint_host)
    names = 1
    if account is None:
        account, _, path = path.partition("/")
        names = 2
    leading_segment(raw_path, names)
    container, slash, blob = path.partition("/")
    if root_blobs and container and not slash:
        container, blob = ROOT_CONTAINER, container
    return ObjectRef(container or None, blob or None, account or None)


def _container_operation(method: str, params: dict[str, str]) -> str:
    if params.get("comp") == "list":
        return "ListBlobs"
    if params.get("restype") != "container":
        return OTHER_OPERATION
    if "comp" not in params:
        return _CONTAINER_VERBS.get(method, OTHER_OPERATION)
    return _CONTAINER_COMPS.get((method, params["comp"]), OTHER_OPERATION)


def _blob_operation(method: str, params: dict[str, str], request: Request) -> str:
    comp = params.get("comp")
    copy_source = request.header("x-ms-copy-source")
    if method == "PUT" and comp in _DATA_COMPS:
        return _DATA_COMPS[comp] + ("FromURL" if copy_source else "")
    if comp is not None:
        return _BLOB_COMPS.get(method, {}).get(comp, OTHER_OPERATION)
    if method == "PUT":
        if not copy_source:
            return "PutBlob"
        if request.header("x-ms-blob-type"):
            return "PutBlobFromURL"
        return "CopyBlobFromURL" if (request.header("x-ms-requires-sync") or "").lower() == "true" else "CopyBlob"
    return _BLOB_VERBS.get(method, OTHER_OPERATION)


def _copy_source(request: Request, endpoint_host: str) -> ObjectRef:
    """x-ms-copy-source: the source blob's URL (its SAS, if any, in the query)."""
    url = urlsplit(request.header("x-ms-copy-source"))
    try:
        source = locate(canonical_host(url.hostname or ""), url.path or "/", endpoint_host)
    except BadRequest as exc:
        raise BadRequest(f"x-ms-copy-source: {exc}") from None
    if not (url.hostname and source.account and source.bucket and source.object_key):
        raise BadRequest("x-ms-copy-source does not name an account, container and blob keycourier can map to a rule")
    return source


def client_key_headers(request: Request) -> list[str]:
    """CPK headers the client sent itself (encryption scopes are a different feature and pass)."""
    cpk = {prefix + name for prefix in (CPK_PREFIX, SOURCE_CPK_PREFIX) for name in CPK_HEADERS}
    return sorted({name.lower() for name, _ in request.headers if name.lower() in cpk})


def render(request: Request, encryption: Encryption) -> tuple[Request, list[str]]:
    """The request with CPK headers for the blob's key and a *FromURL source's key; the names added."""
    headers: dict[str, str] = {}
    for prefix, given in ((CPK_PREFIX, encryption.key), (SOURCE_CPK_PREFIX, encryption.source_key)):
        if given:
            headers[prefix + "key"] = given.b64
            headers[prefix + "key-sha256"] = given.sha256_b64
            headers[prefix + "algorithm"] = "AES256"
    return request.with_header_map(headers), list(headers)


def parse_client_key(request: Request) -> Encryption:
    """The keys a client sent in CPK headers, to render in another provider's dialect."""
    return Encryption(*(parse_customer_key(request, prefix, prefix + "key-sha256", lambda key: key.sha256_b64, "SHA-256")
                        for prefix in (CPK_PREFIX, SOURCE_CPK_PREFIX)))


RESPONSE_KEY_HEADERS = (CPK_PREFIX + "key-sha256",)


def response_key_headers(md5_b64: str, sha256_b64: str, write: bool) -> dict[str, str]:
    """What Azure answers about the customer key a blob was written or read with."""
    encrypted = "x-ms-request-server-encrypted" if write else "x-ms-server-encrypted"
    return {CPK_PREFIX + "key-sha256": sha256_b64, encrypted: "true"}


def key_fingerprint(key: Key) -> str:
    """What Azure itself keeps of the key (x-ms-encryption-key-sha256), safe to log."""
    return key.sha256_b64


def signing_region(request: Request, configured: str | None) -> str | None:
    return configured  # Shared Key has no region


def explain_error(status: int, code: str | None, audit) -> str | None:
    if code == "BlobUsesCustomerSpecifiedEncryption":
        return "the blob was written with a customer-provided key; only a rule that supplies that key can read or change it"
    if code == "BlobCustomerSpecifiedEncryptionMismatch":
        return "the blob was written with another key than the rule's (a key version older than min_version, or another key)"
    if code in ("InvalidHeaderValue", "UnsupportedHeader") and audit.key:
        return f"Azure refused the customer-provided key headers on {audit.operation} (an operation that takes none?)"
    return None


error_body = xml_error_body


def read_outcome(status: int, headers: dict[str, str], body_start: bytes, *, source: bool) -> str:
    """What Azure's answer to a request with a blob's key (a *FromURL's `source` key) says about that key
    (docs/read-errors.md): 409 with x-ms-error-code naming a mismatch (`wrong_key`) or a blob stored without
    a customer key (`plaintext`); a source's failures come as CannotVerifyCopySource with the same message."""
    if status != 409:
        return "served"
    code = headers.get("x-ms-error-code")
    if code == "BlobCustomerSpecifiedEncryptionMismatch" or (code == "CannotVerifyCopySource" and b"does not match" in body_start):
        return "wrong_key"
    if code == "BlobDoesNotUseCustomerSpecifiedEncryption" or (code == "CannotVerifyCopySource" and b"is not encrypted" in body_start):
        return "plaintext"
    return "served"
