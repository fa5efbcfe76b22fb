"""Provider dialects. Each module knows one provider's operations and encryption headers."""
from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import escape

# Providers with a dialect module here; the policy accepts exactly these.
PROVIDERS = ("s3",)


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


def xml_error_body(code: str, message: str) -> tuple[str, bytes]:
    """The <Error><Code/><Message/></Error> document S3, OSS and Azure all answer with; SDKs show it."""
    xml = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error>'
    return "application/xml", xml.encode()


class BadRequest(ValueError):
    """The request cannot be classified; the reason is safe to show the client."""
