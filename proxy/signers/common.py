"""What the providers' signature schemes share: the error every signer raises, URL encoding, and
reading the query parameters and dates that carry a signature."""
from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from urllib.parse import quote_from_bytes, unquote_to_bytes

from keycourier.message import Request

_SECONDS = re.compile(r"[0-9]{1,12}")


class SignatureError(Exception):
    """Raised with a reason safe to show the client (no secrets), e.g. 'signature does not match',
    'request has expired'. Each signer module re-exports it as its own `SignatureError`."""


# --- URL encoding -------------------------------------------------------------------------------

def uri_encode(data: bytes) -> str:
    """AWS UriEncode: every byte but the unreserved A-Za-z0-9-_.~ as %XY (uppercase hex)."""
    return quote_from_bytes(data, safe=b"")


def form_decode(text: str) -> bytes:
    # '+' in a query means space: S3 accepts a space sent as '+' but signed as %20.
    return unquote_to_bytes(text.replace("+", " "))


def query_pairs(raw_query: str) -> list[tuple[str, str | None]]:
    """(name, value) for each query parameter, decoded; value None when the parameter has no '='.
    Bytes that are not UTF-8 survive as surrogates, so the string to sign keeps them."""
    pairs = []
    for part in raw_query.split("&"):
        if part:
            raw_name, separator, raw_value = part.partition("=")
            pairs.append((form_decode(raw_name).decode("utf-8", "surrogateescape"),
                          form_decode(raw_value).decode("utf-8", "surrogateescape") if separator else None))
    return pairs


# --- Reading a signature's fields ---------------------------------------------------------------

def auth_query_parameters(request: Request, names: Iterable[str]) -> dict[str, str]:
    """The request's query parameters among `names`, each given at most once."""
    params: dict[str, str] = {}
    for name, value in request.query:
        if name in names:
            if name in params:
                raise SignatureError(f"{name} given more than once")
            params[name] = value
    return params


def require_parameters(params: dict[str, str], names: Iterable[str]) -> None:
    """Raise SignatureError naming those of `names` missing from `params`."""
    missing = [name for name in names if name not in params]
    if missing:
        raise SignatureError("missing query parameters: " + ", ".join(missing))


def seconds(value: str, name: str) -> int:
    """`value`, the query parameter `name`, as a whole number of seconds (at most 12 digits)."""
    if not _SECONDS.fullmatch(value):
        raise SignatureError(f"malformed {name}")
    return int(value)


def parse_http_date(value: str) -> datetime:
    """An HTTP date (a Date header, or a provider's date header sent in that form) in UTC."""
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        raise SignatureError("malformed request date") from None
    if parsed.tzinfo is None:  # RFC 5322 "-0000": UTC with no zone information
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def with_authorization(request: Request, value: str) -> Request:
    """`request` with its Authorization header set to `value`, keeping the name's case as sent."""
    name = next((name for name, _ in request.headers if name.lower() == "authorization"),
                "Authorization")
    return request.with_header_map({name: value})


def check_presigned_window(now: datetime, signed_at: datetime, expires: int | None, *, parameter: str,
                           max_expires: int, max_clock_skew: timedelta) -> None:
    """Raise SignatureError unless a presigned URL signed at `signed_at` for `expires` seconds (the
    query parameter `parameter`, 1 to `max_expires`) is valid at `now`."""
    if expires is None or not 1 <= expires <= max_expires:
        raise SignatureError(f"{parameter} must be between 1 and {max_expires} seconds")
    if signed_at - now > max_clock_skew:
        raise SignatureError("request is not yet valid")
    if now > signed_at + timedelta(seconds=expires):
        raise SignatureError("request has expired")
