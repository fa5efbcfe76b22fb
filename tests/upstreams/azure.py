"""A strict Azure Blob Storage server for tests (the "Azure test upstream").

It runs in a background thread of the test process and follows Azure's documented
behaviour as closely as it can, so that a proxy bug shows up as a failed request
instead of being papered over. docs/azure.md lists every rule with its source.

Blobs are always encrypted at rest with AES-256-GCM: blobs written with a
customer-provided key (CPK) under that key, all others under a key owned by the server.
Like Azure, only the SHA-256 of a customer key is kept. SharedKey and SAS signatures are
computed by the azure-storage-blob SDK's own signing code (SharedKeyCredentialPolicy,
BlobSharedAccessSignature), fed the request exactly as received.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import re
import secrets
import threading
import traceback
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from email.message import Message
from email.utils import parsedate_to_datetime
from urllib.parse import unquote, urlsplit

import trustme
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.pipeline.transport import HttpRequest
from azure.storage.blob._shared.authentication import SharedKeyCredentialPolicy
from azure.storage.blob._shared_access_signature import BlobSharedAccessSignature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# ReceivedRequest is re-exported: part of this module's API.
from tests.upstreams.common import (CallParameters, ReceivedRequest, Response, ServiceError,
                                    b64decode_or_none, http_date, parse_query, seal, unseal,
                                    utc_now, xml_element)
from tests.upstreams.server import StorageHandler, StorageUpstream

_MAX_CLOCK_SKEW = dt.timedelta(minutes=15)
_ACCOUNT_HOST_SUFFIX = ".blob.core.windows.net"
_CPK = "x-ms-encryption-"
_SOURCE_CPK = "x-ms-source-encryption-"
_STORED_CONTENT_HEADERS = (
    ("Content-Type", "x-ms-blob-content-type"),
    ("Content-Encoding", "x-ms-blob-content-encoding"),
    ("Content-Language", "x-ms-blob-content-language"),
    ("Content-Disposition", "x-ms-blob-content-disposition"),
    ("Cache-Control", "x-ms-blob-cache-control"),
)
_CONTAINER_NAME = re.compile(r"[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]")
_MAX_BLOCK_ID_BYTES = 64


# --- errors ---------------------------------------------------------------------------

class AzureError(ServiceError):
    """An Azure Storage error response: status, x-ms-error-code and message."""


def _authentication_failed(detail: str) -> AzureError:
    return AzureError(403, "AuthenticationFailed", "Server failed to authenticate the request. Make sure "
                      "the value of Authorization header is formed correctly including the signature.",
                      {"AuthenticationErrorDetail": detail})


def _invalid_header(name: str, value: str | None) -> AzureError:
    return AzureError(400, "InvalidHeaderValue", "The value for one of the HTTP headers is not in the "
                      "correct format.", {"HeaderName": name, "HeaderValue": value or ""})


def _missing_header(name: str) -> AzureError:
    return AzureError(400, "MissingRequiredHeader", "An HTTP header that's mandatory for this request is "
                      "not specified.", {"HeaderName": name})


def _unsupported_header(name: str) -> AzureError:
    return AzureError(400, "UnsupportedHeader", "One of the HTTP headers specified in the request is not "
                      "supported.", {"HeaderName": name})


def _not_implemented(what: str) -> AzureError:
    return AzureError(501, "NotImplemented", f"This test upstream does not implement {what}.")


def _blob_not_found() -> AzureError:
    return AzureError(404, "BlobNotFound", "The specified blob does not exist.")


def _uses_cpk() -> AzureError:
    return AzureError(409, "BlobUsesCustomerSpecifiedEncryption",
                      "The blob is encrypted with customer specified encryption, but it was not provided "
                      "in the request.")


# --- customer-provided keys -----------------------------------------------------------

@dataclass(frozen=True)
class CustomerKey:
    key: bytes
    sha256: str  # base64 SHA-256 of the raw key: all Azure keeps of it


def _customer_key(headers: Message, prefix: str, secure: bool, *, read: bool = False) -> CustomerKey | None:
    """Parse and validate one family of CPK headers (target or copy source). The algorithm header is
    required on writes and optional on reads (`read=True`)."""
    names = (prefix + "key", prefix + "key-sha256", prefix + "algorithm")
    key_text, sha_text, algorithm = (headers.get(name) for name in names)
    if key_text is None and sha_text is None and algorithm is None:
        return None
    if not secure:
        raise AzureError(400, "InvalidInput", "One of the request inputs is not valid.",
                         {"Reason": "Customer-provided encryption keys require HTTPS."})
    if read and algorithm is None:
        algorithm = "AES256"
    for name, value in zip(names, (key_text, sha_text, algorithm)):
        if value is None:
            raise _missing_header(name)
    if algorithm != "AES256":
        raise _invalid_header(names[2], algorithm)
    key = b64decode_or_none(key_text)
    if key is None or len(key) != 32:
        raise _invalid_header(names[0], key_text)
    digest = hashlib.sha256(key).digest()
    if b64decode_or_none(sha_text) != digest:
        raise _invalid_header(names[1], sha_text)
    return CustomerKey(key, base64.b64encode(digest).decode())


def _check_key(stored_sha256: str | None, presented: CustomerKey | None, *, copy_source: bool = False) -> None:
    """An operation on an existing blob needs exactly the key it was written with."""
    if stored_sha256 is None:
        if presented is not None:
            raise AzureError(409, "BlobDoesNotUseCustomerSpecifiedEncryption",
                             "The blob is not encrypted with customer specified encryption, but one was "
                             "provided in the request.")
        return
    if presented is None:
        if copy_source:
            raise AzureError(409, "CannotVerifyCopySource", _uses_cpk().message)
        raise _uses_cpk()
    if not hmac.compare_digest(stored_sha256, presented.sha256):
        mismatch = AzureError(409, "BlobCustomerSpecifiedEncryptionMismatch", "The given customer specified "
                              "encryption does not match the encryption used to encrypt the blob.")
        if copy_source:
            raise AzureError(409, "CannotVerifyCopySource", mismatch.message)
        raise mismatch


def _cpk_headers(key_sha256: str | None, *, write: bool) -> list[tuple[str, str]]:
    headers = [("x-ms-request-server-encrypted" if write else "x-ms-server-encrypted", "true")]
    if key_sha256 is not None:
        headers.append(("x-ms-encryption-key-sha256", key_sha256))
    return headers


# --- SharedKey ------------------------------------------------------------------------

def shared_key_signature(account: str, account_key: str, method: str, url: str,
                         headers: list[tuple[str, str]]) -> str:
    """The SharedKey signature the azure-storage-blob SDK computes for this request."""
    request = HttpRequest(method, url)
    for name, value in headers:
        name = name.lower()  # the SDK only picks up lower-case x-ms- names
        if name != "authorization":
            existing = request.headers.get(name)
            request.headers[name] = value if existing is None else f"{existing},{value}"
    pipeline_request = PipelineRequest(request, PipelineContext(None))
    SharedKeyCredentialPolicy(account, account_key).on_request(pipeline_request)
    return request.headers["Authorization"].rpartition(":")[2]


def _request_time(headers: Message) -> dt.datetime:
    text = headers.get("x-ms-date") or headers.get("Date")
    if text is None:
        raise _authentication_failed("Request must contain a valid x-ms-date or Date header.")
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        raise _authentication_failed(f"The Date header in the request is incorrect: {text}") from None
    if moment.tzinfo is None:
        raise _authentication_failed(f"The Date header in the request is incorrect: {text}")
    return moment


def _authenticate(incoming: _Incoming, account: str, accounts: dict[str, str], now: dt.datetime,
                  level: str, container: str | None, blob: str | None) -> None:
    authorization = incoming.headers.get("Authorization")
    params = dict(incoming.query)
    if "sig" in params:
        if authorization is not None:
            raise AzureError(400, "InvalidAuthenticationInfo", "Authentication information is not given "
                             "in the correct format. Check the value of Authorization header.")
        _check_sas(account, accounts[account], container, blob, params, now, incoming.secure,
                   _SAS_PERMISSION[incoming.method])
        return
    if authorization is None:
        if level == "service":
            raise AzureError(401, "NoAuthenticationInformation", "Server failed to authenticate the "
                             "request. Please refer to the information in the www-authenticate header.")
        # Containers here are private: anonymous access looks like no resource at all.
        raise AzureError(404, "ResourceNotFound", "The specified resource does not exist.")
    if incoming.headers.get("x-ms-version") is None:
        raise _missing_header("x-ms-version")
    scheme, _, credential = authorization.partition(" ")
    claimed_account, separator, signature = credential.partition(":")
    if scheme != "SharedKey" or not separator:
        raise AzureError(400, "InvalidAuthenticationInfo", "Authentication information is not given in "
                         "the correct format. Check the value of Authorization header.")
    if claimed_account != account:
        raise _authentication_failed(f"The account {claimed_account} does not match the request.")
    signed_at = _request_time(incoming.headers)
    if abs(now - signed_at) > _MAX_CLOCK_SKEW:
        raise _authentication_failed(f"Request date header too old: '{http_date(signed_at)}'")
    scheme_name = "https" if incoming.secure else "http"
    url = f"{scheme_name}://{incoming.headers.get('Host', '127.0.0.1')}{incoming.raw_path}"
    if incoming.raw_query:
        url += "?" + incoming.raw_query
    expected = shared_key_signature(account, accounts[account], incoming.method, url,
                                    list(incoming.headers.items()))
    if not hmac.compare_digest(expected, signature):
        raise _authentication_failed(f"The MAC signature found in the HTTP request '{signature}' is not "
                                     "the same as any computed signature.")


# --- shared access signatures ---------------------------------------------------------

# The permission a service SAS must grant for each method (Create Blob also accepts "c").
_SAS_PERMISSION = {"GET": "r", "HEAD": "r", "PUT": "w", "DELETE": "d"}
_SAS_PARAMS = frozenset({"sv", "sr", "sp", "st", "se", "sip", "spr", "rscc", "rscd", "rsce", "rscl", "rsct",
                         "ses", "sig"})
_OPERATION_PARAMS = frozenset({"comp", "blockid", "restype", "timeout"})
_QUERY_PARAMS = _SAS_PARAMS | _OPERATION_PARAMS | {"prefix", "marker", "maxresults"}


def blob_sas_signature(account: str, account_key: str, container: str, blob: str,
                       params: dict[str, str]) -> str:
    """The `sig` the azure-storage-blob SDK's generate_blob_sas computes for these SAS parameters."""
    signer = BlobSharedAccessSignature(account, account_key)
    signer.x_ms_version = params.get("sv")  # sign as the version the SAS declares
    token = signer.generate_blob(
        container, blob, permission=params.get("sp"), expiry=params.get("se"), start=params.get("st"),
        ip=params.get("sip"), protocol=params.get("spr"), cache_control=params.get("rscc"),
        content_disposition=params.get("rscd"), content_encoding=params.get("rsce"),
        content_language=params.get("rscl"), content_type=params.get("rsct"),
        encryption_scope=params.get("ses"))
    return dict(parse_query(token))["sig"]


def _parse_sas_time(text: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise _authentication_failed(f"Signed time {text} is not in a supported format.") from None


def _check_sas(account: str, account_key: str, container: str | None, blob: str | None,
               params: dict[str, str], now: dt.datetime, secure: bool, permission: str) -> None:
    """Authorize a request (or a copy source) by a blob service SAS."""
    if params.get("sr") != "b" or not blob or params.keys() - _SAS_PARAMS - _OPERATION_PARAMS:
        raise _not_implemented("shared access signatures other than plain blob service SAS")
    for name in ("sv", "sp", "se"):
        if name not in params:
            raise _authentication_failed(f"Signature fields not well formed: {name} is missing.")
    expected = blob_sas_signature(account, account_key, container, blob, params)
    if not hmac.compare_digest(expected, params["sig"]):
        raise _authentication_failed("Signature did not match.")
    start = _parse_sas_time(params["st"]) if "st" in params else None
    expiry = _parse_sas_time(params["se"])
    if (start is not None and now < start) or now > expiry:
        raise _authentication_failed(f"Signed expiry time [{params['se']}] must be after the current time "
                                     "and any signed start time.")
    if params.get("spr") == "https" and not secure:
        raise AzureError(403, "AuthorizationProtocolMismatch", "This request is not authorized to perform "
                         "this operation using this protocol.")
    granted = params["sp"]
    if permission not in granted and not (permission == "w" and "c" in granted):
        raise AzureError(403, "AuthorizationPermissionMismatch", "This request is not authorized to perform "
                         "this operation using this permission.")


# --- stored state ---------------------------------------------------------------------

@dataclass(frozen=True)
class StoredBlob:
    """A blob as held at rest. `data_on_disk` is ciphertext: never the plaintext."""

    data_on_disk: bytes
    encryption_key_sha256: str | None  # base64 SHA-256 of the customer key, for CPK blobs
    size: int  # plaintext length
    blob_type: str
    etag: str  # quoted, as in the ETag header
    last_modified: dt.datetime
    metadata: dict[str, str]
    content_headers: tuple[tuple[str, str], ...]
    committed_blocks: tuple[str, ...]  # block ids, for blobs made by Put Block List
    uncommitted_blocks: tuple[str, ...] = ()  # filled in by AzureBlobUpstream.stored()


@dataclass(frozen=True)
class _Block:
    sealed: bytes
    key_sha256: str | None


@dataclass
class _Container:
    name: str
    created: dt.datetime
    etag: str
    blobs: dict[str, StoredBlob] = field(default_factory=dict)
    staged: dict[str, dict[str, _Block]] = field(default_factory=dict)  # blob -> block id -> block


@dataclass
class _Account:
    name: str
    key: str
    containers: dict[str, _Container] = field(default_factory=dict)


def _new_etag() -> str:
    return f'"0x{secrets.token_hex(8).upper()}"'


class _Store:
    def __init__(self, accounts: dict[str, str]):
        self.accounts = {name: _Account(name, key) for name, key in accounts.items()}
        self.lock = threading.Lock()
        self._server_key = AESGCM.generate_key(256)

    def add_container(self, account: str, name: str) -> bool:
        if not _CONTAINER_NAME.fullmatch(name):
            raise AzureError(400, "InvalidResourceName", "The specified resource name contains invalid "
                             "characters.")
        with self.lock:
            containers = self.accounts[account].containers
            if name in containers:
                return False
            containers[name] = _Container(name, utc_now(), _new_etag())
            return True

    def seal(self, customer_key: CustomerKey | None, data: bytes) -> bytes:
        return seal(customer_key.key if customer_key else self._server_key, data)

    def unseal(self, customer_key: CustomerKey | None, sealed: bytes) -> bytes:
        return unseal(customer_key.key if customer_key else self._server_key, sealed)

    def handle(self, incoming: _Incoming, read_body) -> Response:
        account, container, blob = _address(incoming.headers.get("Host", ""), incoming.raw_path)
        if account not in self.accounts:
            raise AzureError(400, "InvalidUri", "The requested URI does not represent any resource on "
                             "the server.")
        level = "blob" if blob else "container" if container else "service"
        _authenticate(incoming, account, {name: a.key for name, a in self.accounts.items()},
                      dt.datetime.now(dt.UTC), level, container, blob)
        params = dict(incoming.query)
        unknown = sorted(params.keys() - _QUERY_PARAMS)
        if unknown:
            # e.g. snapshot, versionid, delimiter, include: ignoring them would answer a different question.
            raise _not_implemented(f"the query parameter {unknown[0]}")
        selector = (incoming.method, level, params.get("restype"), params.get("comp"))
        operation = _OPERATIONS.get(selector)
        if operation is None:
            raise _not_implemented(f"{incoming.method} on a {level} with restype={selector[2]}, comp={selector[3]}")
        body = read_body()
        return operation(_Call(self, incoming, self.accounts[account], container, blob, body))


# --- requests and responses -----------------------------------------------------------

@dataclass(frozen=True)
class _Incoming:
    method: str
    raw_path: str  # still percent-encoded
    raw_query: str
    query: list[tuple[str, str]]  # decoded, in order
    headers: Message
    secure: bool


def _address(host: str, raw_path: str) -> tuple[str, str | None, str | None]:
    """(account, container, blob) from an account host name or an Azurite-style path."""
    hostname = host.rpartition(":")[0] or host
    path = unquote(raw_path)[1:]
    if hostname.endswith(_ACCOUNT_HOST_SUFFIX):
        account = hostname.removesuffix(_ACCOUNT_HOST_SUFFIX)
    else:
        account, _, path = path.partition("/")
    container, _, blob = path.partition("/")
    return account, container or None, blob or None


def _error_response(error: AzureError, request_id: str) -> Response:
    message = f"{error.message}\nRequestId:{request_id}\nTime:{utc_now().strftime('%Y-%m-%dT%H:%M:%S.0000000Z')}"
    root = xml_element("Error", None, xml_element("Code", error.code), xml_element("Message", message))
    root.extend(xml_element(name, value) for name, value in error.details.items())
    body = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return Response(error.status, [("Content-Type", "application/xml"),
                                   ("x-ms-error-code", error.code)], body)


_UNSUPPORTED_CONDITIONS = ("If-Modified-Since", "If-Unmodified-Since", "x-ms-if-tags", "x-ms-lease-id")


def _etag_matches(condition: str, etag: str | None) -> bool:
    candidates = {candidate.strip() for candidate in condition.split(",")}
    return etag is not None and ("*" in candidates or etag in candidates)


def _condition_not_met(status: int) -> AzureError:
    return AzureError(status, "ConditionNotMet", "The condition specified using HTTP conditional header(s) is "
                      "not met.")


def _validators(etag: str, last_modified: dt.datetime) -> list[tuple[str, str]]:
    return [("ETag", etag), ("Last-Modified", http_date(last_modified))]


@dataclass
class _Call(CallParameters):
    """One authenticated request, routed to an operation."""

    store: _Store
    incoming: _Incoming
    account: _Account
    container_name: str | None
    blob_name: str | None
    body: bytes

    def container(self, name: str | None = None) -> _Container:
        container = self.account.containers.get(name or self.container_name)
        if container is None:
            raise AzureError(404, "ContainerNotFound", "The specified container does not exist.")
        return container

    def blob(self) -> StoredBlob:
        blob = self.container().blobs.get(self.blob_name)
        if blob is None:
            raise _blob_not_found()
        return blob

    def customer_key(self, prefix: str = _CPK, *, read: bool = False) -> CustomerKey | None:
        return _customer_key(self.incoming.headers, prefix, self.incoming.secure, read=read)

    def copy_source(self, *, by_url: bool) -> tuple[StoredBlob, CustomerKey | None]:
        """The blob x-ms-copy-source names, checked against the source CPK headers.

        Operations "From URL" read the source like any client would, so the source URL must
        authorize itself (a SAS); Copy Blob within the account is covered by the request's own
        authorization.
        """
        url = urlsplit(self.header("x-ms-copy-source"))
        query = parse_query(url.query)
        account, container, blob = _address(url.netloc, url.path)
        source_account = self.store.accounts.get(account)
        if source_account is None or not container or not blob:
            raise AzureError(400, "InvalidHeaderValue", "The value for one of the HTTP headers is not in the "
                             "correct format.", {"HeaderName": "x-ms-copy-source"})
        if by_url or source_account is not self.account:
            try:
                if "sig" not in dict(query):
                    raise AzureError(404, "ResourceNotFound", "The specified resource does not exist.")
                _check_sas(account, source_account.key, container, blob, dict(query), dt.datetime.now(dt.UTC),
                           url.scheme == "https", "r")
            except AzureError as error:
                # Azure reports the source's own answer under CannotVerifyCopySource.
                raise AzureError(error.status, "CannotVerifyCopySource", error.message) from None
        source = source_account.containers.get(container)
        source_blob = source.blobs.get(blob) if source else None
        if source_blob is None:
            raise AzureError(404, "CannotVerifyCopySource", "The specified blob does not exist.")
        source_key = self.customer_key(_SOURCE_CPK)
        _check_key(source_blob.encryption_key_sha256, source_key, copy_source=True)
        return source_blob, source_key

    def refuse_keys(self, *prefixes: str) -> None:
        """Refuse CPK headers on operations that do not take them."""
        for name in self.incoming.headers.keys():
            if name.lower().startswith(prefixes):
                raise _unsupported_header(name.lower())

    def refuse_source_key(self) -> None:
        """Only Put Blob/Block From URL take x-ms-source-encryption-*."""
        self.refuse_keys(_SOURCE_CPK)

    def metadata(self) -> dict[str, str]:
        metadata = {}
        for name, value in self.incoming.headers.items():
            if name.lower().startswith("x-ms-meta-"):
                key = name[len("x-ms-meta-"):]
                if not key:
                    raise AzureError(400, "EmptyMetadataKey", "The key for one of the metadata key-value "
                                     "pairs is empty.")
                metadata[key] = value
        return metadata

    def content_headers(self) -> tuple[tuple[str, str], ...]:
        stored = [(name, self.header(source)) for name, source in _STORED_CONTENT_HEADERS
                  if self.header(source) is not None]
        if not any(name == "Content-Type" for name, _ in stored):
            stored.append(("Content-Type", "application/octet-stream"))
        return tuple(stored)

    def check_content_md5(self) -> None:
        claimed = self.header("Content-MD5")
        if claimed is not None and b64decode_or_none(claimed) != hashlib.md5(self.body).digest():
            raise AzureError(400, "Md5Mismatch", "The MD5 value specified in the request did not match "
                             "with the MD5 value calculated by the server.")

    def check_conditions(self, existing: StoredBlob | None, *, write: bool) -> None:
        """If-Match and If-None-Match against the blob as it is now."""
        for name in _UNSUPPORTED_CONDITIONS:
            if self.header(name) is not None:
                raise _not_implemented(f"the {name} header")
        etag = existing.etag if existing else None
        if_match, if_none_match = self.header("If-Match"), self.header("If-None-Match")
        if if_match is not None and not _etag_matches(if_match, etag):
            raise _condition_not_met(412)
        if if_none_match is not None and _etag_matches(if_none_match, etag):
            if write and if_none_match.strip() == "*":
                raise AzureError(409, "BlobAlreadyExists", "The specified blob already exists.")
            raise _condition_not_met(412 if write else 304)

    def save(self, data: bytes, customer_key: CustomerKey | None, *, blob_type: str,
             committed_blocks: tuple[str, ...] = (), metadata: dict[str, str] | None = None,
             content_headers: tuple[tuple[str, str], ...] | None = None) -> StoredBlob:
        self.check_conditions(self.container().blobs.get(self.blob_name), write=True)
        blob = StoredBlob(
            data_on_disk=self.store.seal(customer_key, data),
            encryption_key_sha256=customer_key.sha256 if customer_key else None,
            size=len(data), blob_type=blob_type, etag=_new_etag(), last_modified=utc_now(),
            metadata=self.metadata() if metadata is None else metadata,
            content_headers=self.content_headers() if content_headers is None else content_headers,
            committed_blocks=committed_blocks)
        container = self.container()
        with self.store.lock:
            container.blobs[self.blob_name] = blob
            # Committing a blob discards every block staged for it that it did not use.
            container.staged.pop(self.blob_name, None)
        return blob

    def written(self, blob: StoredBlob) -> Response:
        return Response(201, [*_validators(blob.etag, blob.last_modified),
                              *_cpk_headers(blob.encryption_key_sha256, write=True)])


# --- operations -----------------------------------------------------------------------

def _create_container(call: _Call) -> Response:
    if not call.store.add_container(call.account.name, call.container_name):
        raise AzureError(409, "ContainerAlreadyExists", "The specified container already exists.")
    container = call.container()
    return Response(201, _validators(container.etag, container.created))


def _list_blobs(call: _Call) -> Response:
    container = call.container()
    prefix = call.params.get("prefix", "")
    marker = call.params.get("marker", "")  # the first name of the page, as our NextMarker gives it
    max_results = call.params.get("maxresults", "5000")
    if not max_results.isdigit() or int(max_results) == 0:
        raise AzureError(400, "InvalidQueryParameterValue", "Value for one of the query parameters specified "
                         "in the request URI is invalid.", {"QueryParameterName": "maxresults",
                                                             "QueryParameterValue": max_results})
    with call.store.lock:
        remaining = sorted((name, blob) for name, blob in container.blobs.items()
                           if name.startswith(prefix) and name >= marker)
    page, rest = remaining[:int(max_results)], remaining[int(max_results):]
    items = []
    for name, blob in page:
        content = dict(blob.content_headers)
        properties = xml_element(
            "Properties", None,
            xml_element("Creation-Time", http_date(blob.last_modified)),
            xml_element("Last-Modified", http_date(blob.last_modified)),
            xml_element("Etag", blob.etag),
            xml_element("Content-Length", blob.size),
            xml_element("Content-Type", content.get("Content-Type", "")),
            xml_element("BlobType", blob.blob_type),
            xml_element("LeaseStatus", "unlocked"),
            xml_element("LeaseState", "available"),
            xml_element("ServerEncrypted", "true"))
        if blob.encryption_key_sha256 is not None:
            properties.append(xml_element("CustomerProvidedKeySha256", blob.encryption_key_sha256))
        items.append(xml_element("Blob", None, xml_element("Name", name), properties))
    root = xml_element("EnumerationResults", None, xml_element("Prefix", prefix), xml_element("Marker", marker),
                       xml_element("MaxResults", max_results), xml_element("Blobs", None, *items),
                       xml_element("NextMarker", rest[0][0] if rest else None))
    host = call.header("Host") or ""
    account_path = "" if host.endswith(_ACCOUNT_HOST_SUFFIX) else call.account.name
    root.set("ServiceEndpoint", f"{'https' if call.incoming.secure else 'http'}://{host}/{account_path}")
    root.set("ContainerName", container.name)
    body = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return Response(200, [("Content-Type", "application/xml")], body)


def _put_blob(call: _Call) -> Response:
    """Put Blob, or one of the three operations that share its shape but name a source blob."""
    if call.header("x-ms-copy-source") is not None:
        if (call.header("x-ms-requires-sync") or "").lower() == "true":
            return _copy_blob(call, by_url=True)
        if call.header("x-ms-blob-type") is None:
            return _copy_blob(call, by_url=False)
        return _put_blob_from_url(call)
    call.refuse_source_key()
    _require_block_blob(call)
    if call.header("Content-Length") is None:
        raise AzureError(411, "MissingContentLengthHeader", "The Content-Length header was not specified.")
    call.check_content_md5()
    response = call.written(call.save(call.body, call.customer_key(), blob_type="BlockBlob"))
    response.headers.append(("Content-MD5", _md5_b64(call.body)))
    return response


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _require_block_blob(call: _Call) -> None:
    blob_type = call.header("x-ms-blob-type")
    if blob_type is None:
        raise _missing_header("x-ms-blob-type")
    if blob_type != "BlockBlob":
        raise _not_implemented(f"{blob_type} blobs")


def _put_blob_from_url(call: _Call) -> Response:
    _require_block_blob(call)
    source, source_key = call.copy_source(by_url=True)
    data = call.store.unseal(source_key, source.data_on_disk)
    return call.written(call.save(data, call.customer_key(), blob_type="BlockBlob"))


def _copy_blob(call: _Call, *, by_url: bool) -> Response:
    """Copy Blob (completing before it answers) or Copy Blob From URL: neither takes a CPK."""
    call.refuse_keys(_CPK, _SOURCE_CPK)
    source, _ = call.copy_source(by_url=by_url)
    data = call.store.unseal(None, source.data_on_disk)
    metadata = call.metadata() or source.metadata
    blob = call.save(data, None, blob_type=source.blob_type, metadata=metadata,
                     content_headers=source.content_headers)
    return Response(202, [*_validators(blob.etag, blob.last_modified),
                          ("x-ms-copy-id", str(uuid.uuid4())), ("x-ms-copy-status", "success")])


def _put_block(call: _Call) -> Response:
    """Put Block, or Put Block From URL when x-ms-copy-source names the data."""
    if call.header("x-ms-copy-source") is not None:
        source, source_key = call.copy_source(by_url=True)
        data = call.store.unseal(source_key, source.data_on_disk)
        source_range = call.header("x-ms-source-range")
        if source_range is not None:
            first, last = _byte_range(source_range, source.size)
            data = data[first:last + 1]
    else:
        call.refuse_source_key()
        call.check_content_md5()
        data = call.body
    block_id = call.params.get("blockid", "")
    raw_id = b64decode_or_none(block_id)
    if raw_id is None or not raw_id or len(raw_id) > _MAX_BLOCK_ID_BYTES:
        raise AzureError(400, "InvalidQueryParameterValue", "Value for one of the query parameters "
                         "specified in the request URI is invalid.", {"QueryParameterName": "blockid",
                                                                     "QueryParameterValue": block_id})
    container = call.container()
    customer_key = call.customer_key()
    with call.store.lock:
        existing = container.blobs.get(call.blob_name)
        staged = container.staged.setdefault(call.blob_name, {})
        if any(len(base64.b64decode(other)) != len(raw_id) for other in staged):
            raise AzureError(400, "InvalidBlobOrBlock", "The specified blob or block content is invalid.")
    if existing is not None and existing.encryption_key_sha256 is not None:
        # Writes to a CPK blob need its key; a plain blob may be replaced by CPK blocks.
        _check_key(existing.encryption_key_sha256, customer_key)
    block = _Block(call.store.seal(customer_key, data), customer_key.sha256 if customer_key else None)
    with call.store.lock:
        staged[block_id] = block
    return Response(201, [("Content-MD5", _md5_b64(data)), *_cpk_headers(block.key_sha256, write=True)])


def _put_block_list(call: _Call) -> Response:
    call.refuse_source_key()
    container = call.container()
    customer_key = call.customer_key()
    try:
        root = ET.fromstring(call.body)
    except ET.ParseError:
        raise AzureError(400, "InvalidXmlDocument", "XML specified is not syntactically valid.") from None
    if root.tag != "BlockList":
        raise AzureError(400, "InvalidXmlDocument", "XML specified is not syntactically valid.")
    with call.store.lock:
        existing = container.blobs.get(call.blob_name)
        staged = dict(container.staged.get(call.blob_name, {}))
    committed = existing.committed_blocks if existing else ()
    pieces, block_ids = [], []
    for entry in root:
        block_id = entry.text or ""
        if entry.tag == "Uncommitted" or (entry.tag == "Latest" and block_id in staged):
            block = staged.get(block_id)
            if block is None:
                raise AzureError(400, "InvalidBlockList", "The specified block list is invalid.")
            _check_key(block.key_sha256, customer_key)
            pieces.append(call.store.unseal(customer_key, block.sealed))
        elif entry.tag in ("Committed", "Latest") and block_id in committed:
            raise _not_implemented("re-committing blocks of an existing blob")
        else:
            raise AzureError(400, "InvalidBlockList", "The specified block list is invalid.")
        block_ids.append(block_id)
    blob = call.save(b"".join(pieces), customer_key, blob_type="BlockBlob", committed_blocks=tuple(block_ids))
    return call.written(blob)


def _blob_properties_headers(blob: StoredBlob) -> list[tuple[str, str]]:
    return [*_validators(blob.etag, blob.last_modified), ("x-ms-blob-type", blob.blob_type),
            ("x-ms-creation-time", http_date(blob.last_modified)),
            ("x-ms-lease-status", "unlocked"), ("x-ms-lease-state", "available"),
            *blob.content_headers, *((f"x-ms-meta-{name}", value) for name, value in blob.metadata.items()),
            *_cpk_headers(blob.encryption_key_sha256, write=False)]


def _get_blob(call: _Call) -> Response:
    call.refuse_source_key()
    blob = call.blob()
    customer_key = call.customer_key(read=True)
    _check_key(blob.encryption_key_sha256, customer_key)
    call.check_conditions(blob, write=False)
    headers = [*_blob_properties_headers(blob), ("Accept-Ranges", "bytes")]
    byte_range = _byte_range(call.header("x-ms-range") or call.header("Range"), blob.size)
    data = call.store.unseal(customer_key, blob.data_on_disk)
    if byte_range is None:
        status, body = 200, data
    else:
        first, last = byte_range
        status, body = 206, data[first:last + 1]
        headers.append(("Content-Range", f"bytes {first}-{last}/{blob.size}"))
    headers.append(("Content-Length", str(len(body))))
    if status == 200 or call.header("x-ms-range-get-content-md5") == "true":
        headers.append(("Content-MD5", _md5_b64(body)))
    return Response(status, headers, body)


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) of a `bytes=first-[last]` range; Azure answers 416 past the end."""
    if header is None:
        return None
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", header.strip())
    if match is None or (match[2] and int(match[2]) < int(match[1])):
        raise _invalid_header("x-ms-range", header)
    first = int(match[1])
    if first >= size:
        raise AzureError(416, "InvalidRange", "The range specified is invalid for the current size of the "
                         "resource.")
    return first, min(int(match[2]), size - 1) if match[2] else size - 1


def _get_blob_properties(call: _Call) -> Response:
    call.refuse_source_key()
    blob = call.blob()
    _check_key(blob.encryption_key_sha256, call.customer_key(read=True))
    call.check_conditions(blob, write=False)
    return Response(200, [*_blob_properties_headers(blob), ("Content-Length", str(blob.size))])


def _get_blob_metadata(call: _Call) -> Response:
    call.refuse_source_key()
    blob = call.blob()
    _check_key(blob.encryption_key_sha256, call.customer_key(read=True))
    call.check_conditions(blob, write=False)
    return Response(200, [*_validators(blob.etag, blob.last_modified),
                          *((f"x-ms-meta-{name}", value) for name, value in blob.metadata.items()),
                          *_cpk_headers(blob.encryption_key_sha256, write=False)])


def _set_blob_metadata(call: _Call) -> Response:
    call.refuse_source_key()
    blob = call.blob()
    _check_key(blob.encryption_key_sha256, call.customer_key())
    call.check_conditions(blob, write=True)
    updated = dataclasses.replace(blob, metadata=call.metadata(), etag=_new_etag(), last_modified=utc_now())
    container = call.container()
    with call.store.lock:
        container.blobs[call.blob_name] = updated
    return Response(200, [*_validators(updated.etag, updated.last_modified),
                          *_cpk_headers(updated.encryption_key_sha256, write=True)])


def _delete_blob(call: _Call) -> Response:
    call.check_conditions(call.blob(), write=True)
    container = call.container()
    with call.store.lock:
        container.blobs.pop(call.blob_name, None)
        container.staged.pop(call.blob_name, None)
    return Response(202, [("x-ms-delete-type-permanent", "true")])


_OPERATIONS = {
    ("PUT", "container", "container", None): _create_container,
    ("GET", "container", "container", "list"): _list_blobs,
    ("PUT", "blob", None, None): _put_blob,
    ("PUT", "blob", None, "block"): _put_block,
    ("PUT", "blob", None, "blocklist"): _put_block_list,
    ("GET", "blob", None, None): _get_blob,
    ("HEAD", "blob", None, None): _get_blob_properties,
    ("GET", "blob", None, "metadata"): _get_blob_metadata,
    ("HEAD", "blob", None, "metadata"): _get_blob_metadata,
    ("PUT", "blob", None, "metadata"): _set_blob_metadata,
    ("DELETE", "blob", None, None): _delete_blob,
}


# --- HTTP -----------------------------------------------------------------------------

class _Handler(StorageHandler):
    server_version = "Windows-Azure-Blob/1.0"

    def _serve(self):
        upstream: AzureBlobUpstream = self.server.owner
        raw_path, raw_query, query, record = self.receive()
        request_id = str(uuid.uuid4())
        incoming = _Incoming(self.command, raw_path, raw_query, query, self.headers, upstream.tls)
        try:
            response = upstream._store.handle(incoming, self._read_body)
        except AzureError as error:
            response = _error_response(error, request_id)
        except Exception:
            upstream.internal_errors.append(traceback.format_exc())
            response = _error_response(AzureError(500, "InternalError", "The server encountered an "
                                                  "internal error. Please retry the request."), request_id)
        if response.status == 304:
            response.body = b""  # a 304 never has a body, error or not
        record.status = response.status
        self._send(response, request_id)

    do_GET = do_PUT = do_DELETE = do_HEAD = _serve

    def _read_body(self) -> bytes:
        self._body_consumed = True
        if self.headers.get("Transfer-Encoding") is not None:
            raise _unsupported_header("transfer-encoding")
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit():
            raise _invalid_header("Content-Length", length)
        body = self.rfile.read(int(length))
        if len(body) != int(length):
            raise AzureError(400, "InvalidInput", "One of the request inputs is not valid.")
        return body

    def _send(self, response: Response, request_id: str):
        if self.body_left_unread():
            # The client may still send a body we did not read: this connection cannot be reused.
            self.close_after_response(response.headers)
        headers = [("x-ms-request-id", request_id)]
        for echoed in ("x-ms-version", "x-ms-client-request-id"):
            value = self.headers.get(echoed)
            if value is not None:
                headers.append((echoed, value))
        self.write_response(response.status, [*headers, *response.headers], response.body,
                            without_length=(304,))


class AzureBlobUpstream(StorageUpstream):
    """A strict Azure Blob Storage server on 127.0.0.1, for driving real Azure clients in tests."""

    handler = _Handler
    thread_name = "azure-upstream"
    # Also valid for account host names, so a client (or proxy) can verify it by SNI.
    extra_hostnames = ("*" + _ACCOUNT_HOST_SUFFIX,)

    def __init__(self, ca: trustme.CA | None, accounts: dict[str, str], *, tls: bool = True):
        super().__init__(ca, tls=tls)
        self._store = _Store(dict(accounts))

    def blob_url(self, account: str, container: str = "", blob: str = "") -> str:
        """An Azurite-style URL: the account is the first path segment."""
        return "/".join(part for part in (self.endpoint_url, account, container, blob) if part)

    def create_container(self, account: str, name: str) -> None:
        if not self._store.add_container(account, name):
            raise ValueError(f"container {name!r} already exists in {account!r}")

    def stored(self, account: str, container: str, blob: str) -> StoredBlob:
        with self._store.lock:
            holder = self._store.accounts[account].containers[container]
            staged = tuple(holder.staged.get(blob, {}))
            return dataclasses.replace(holder.blobs[blob], uncommitted_blocks=staged)
