"""Provider dialects. Each module knows one provider's operations and encryption headers."""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote
from xml.sax.saxutils import escape

# Providers with a dialect module here; the policy accepts exactly these.
PROVIDERS = ("s3", "azure", "oss")
# Operation names come from each dialect's fixed tables, so logs and metric labels stay a bounded
# vocabulary; anything else is this.
OTHER_OPERATION = "Other"


@dataclass(frozen=True)
class ObjectRef:
    """Where an object lives. `bucket` is the S3 or OSS bucket, or the Azure container."""

    bucket: str | None
    object_key: str | None = None
    account: str | None = None  # the Azure storage account


@dataclass(frozen=True)
class Operation:
    """What a request does, in the provider's own operation names."""

    provider: str
    name: str
    bucket: str | None = None
    object_key: str | None = None
    copy_source: ObjectRef | None = None  # the object a copy reads
    accepts_encryption: bool = False  # the provider takes encryption headers on this operation
    account: str | None = None

    @property
    def target(self) -> ObjectRef:
        return ObjectRef(self.bucket, self.object_key, self.account)


@dataclass(frozen=True)
class Encryption:
    """What a request must carry: customer keys (S3 SSE-C, Azure CPK) or provider-managed encryption (OSS)."""

    key: object | None = None  # proxy.keys.Key for the object written or read
    source_key: object | None = None  # proxy.keys.Key for a copy's source object
    managed: str | None = None  # OSS: AES256, SM4 or KMS
    managed_key_id: str | None = None  # OSS: the KMS key id


def parse_customer_key(request, prefix: str, digest_header: str, digest_of, digest_name: str):
    """The key a client sent itself in one dialect's headers (`prefix` + key, algorithm and
    `digest_header`), checked as the provider checks it; None when it sent none."""
    from keycourier.keys import Key, KeyUnavailable, decode_key

    encoded = request.header(prefix + "key")
    if encoded is None:
        return None
    if (request.header(prefix + "algorithm") or "").upper() != "AES256":
        raise BadRequest(f"{prefix}algorithm must be AES256")
    try:
        key = Key("client", "client", decode_key("sent by the client", encoded))
    except KeyUnavailable as exc:
        raise BadRequest(str(exc)) from None
    if request.header(digest_header) not in (None, digest_of(key)):
        raise BadRequest(f"the {digest_name} in {digest_header} does not match the key sent")
    return key


def name_s3_style_operation(request, bucket: str | None, object_key: str | None, bucket_operation, object_operation) -> str:
    """S3-style APIs (S3, OSS): a service, bucket or object operation, by method and sub-resources."""
    params = {name for name, _ in request.query}
    method = request.method.upper()
    if bucket is None:
        return "ListBuckets" if method == "GET" else OTHER_OPERATION
    if object_key is None:
        return bucket_operation(method, params)
    return object_operation(method, params, request)


_UNSAFE_PATH_CHARACTERS = re.compile(r"[\x00-\x1f\x7f\\]")
# RFC 3986 path characters, but ';' (path parameters, which some servers strip): what SDKs send unencoded.
_RAW_PATH = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@/%]*")


def decoded_path(raw_path: str) -> str:
    """The percent-decoded path, refused in the forms that providers and S3-compatible servers read
    differently (merging slashes, resolving dot segments; docs/paths.md): keycourier must see the same
    bucket and object as the provider. Messages never quote the path: object names go to logs."""
    if not _RAW_PATH.fullmatch(raw_path):
        raise BadRequest("the path has a character that must be percent-encoded (servers read it differently)")
    try:
        path = unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("the path is not valid UTF-8 once percent-decoded") from None
    segments = path.split("/")
    if segments[0]:
        raise BadRequest("the request target is not an absolute path")
    if any(segment in (".", "..") for segment in segments[1:]):
        raise BadRequest("the path has a dot segment (/./ or /../), which servers resolve differently")
    if "" in segments[1:-1]:
        raise BadRequest("the path has an empty segment (//), which servers merge differently")
    if _UNSAFE_PATH_CHARACTERS.search(path):
        raise BadRequest("the path has a control character or backslash, which servers read differently")
    return path


def leading_segment(raw_path: str, names: int = 1) -> None:
    """Refuses percent-encoding in the path's leading `names` segments as sent: names (bucket, account,
    container) never need it, and servers decode them at different points."""
    if any("%" in segment for segment in raw_path.removeprefix("/").split("/")[:names]):
        raise BadRequest("a bucket, account or container name in the path is percent-encoded")


def s3_style_location(request, endpoint_host: str, service_host: re.Pattern, virtual_hosted: re.Pattern) -> tuple[str | None, str | None]:
    """Bucket and object key of an S3-style API (S3, OSS): virtual-hosted under the provider's domain
    (`virtual_hosted` names the bucket) or a `*.<domain>` endpoint, else path style (/bucket/key)."""
    path = decoded_path(request.path).removeprefix("/")
    host = request.host
    bucket = None
    if not service_host.match(host):
        virtual = virtual_hosted.match(host)
        bucket = virtual["bucket"] if virtual else bucket_in_host(host, endpoint_host)
    if bucket:
        return bucket, path or None
    leading_segment(request.path)
    bucket, _, object_key = path.partition("/")
    return bucket or None, object_key or None


def copy_source_ref(request, header: str) -> ObjectRef:
    """An S3-style copy source header: [/]bucket/key[?versionId=v], URL-encoded."""
    raw = "/" + request.header(header).split("?", 1)[0].removeprefix("/")
    try:
        bucket, _, object_key = decoded_path(raw).removeprefix("/").partition("/")
        leading_segment(raw)
    except BadRequest as exc:
        raise BadRequest(f"{header}: {exc}") from None
    if not bucket or not object_key or bucket.startswith("arn:"):
        raise BadRequest(f"{header} does not name a bucket and object keycourier can map to a rule")
    return ObjectRef(bucket, object_key)


def bucket_in_host(host: str, endpoint_host: str) -> str | None:
    """The leading label(s) of `host` under a policy endpoint written `*.<domain>`: that is how an
    endpoint says its buckets (Azure: accounts) are addressed virtual-hosted, as SDKs do by default."""
    endpoint_glob = endpoint_host.lower().split(":")[0]
    domain = endpoint_glob[1:] if endpoint_glob.startswith("*.") else None
    if domain and host.endswith(domain) and len(host) > len(domain):
        return host[: -len(domain)]
    return None


def xml_error_body(code: str, message: str) -> tuple[str, bytes]:
    """The <Error><Code/><Message/></Error> document S3, OSS and Azure all answer with; SDKs show it."""
    xml = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error>'
    return "application/xml", xml.encode()


class BadRequest(ValueError):
    """The request cannot be classified; the reason is safe to show the client."""
