"""URL encoding the providers' signature schemes share."""
from __future__ import annotations

from urllib.parse import quote_from_bytes, unquote_to_bytes


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
