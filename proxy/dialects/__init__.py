"""Provider dialects. Each module knows one provider's operations and encryption headers."""
from __future__ import annotations

from dataclasses import dataclass

# Providers with a dialect module here; the policy accepts exactly these.
PROVIDERS = ("s3",)


@dataclass(frozen=True)
class Operation:
    """What a request does, in the provider's own operation names."""

    provider: str
    name: str
    bucket: str | None = None
    object_key: str | None = None
    copy_source: tuple[str, str] | None = None  # (bucket, object key) read by a copy
    takes_key: bool = False  # the provider accepts customer key headers on this operation


class BadRequest(ValueError):
    """The request cannot be classified; the reason is safe to show the client."""
