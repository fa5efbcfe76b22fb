"""No key leaves in a response: what a provider answers to a request that carried a key is scrubbed of
that key, in every encoding a server might echo it in (an S3 SignatureDoesNotMatch document quotes the
canonical request, signed key headers included). Replacements keep the length, so bodies stay
streamed and Content-Length stays true."""
from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Callable, Iterable
from urllib.parse import quote

REDACTED = "[redacted by keycourier]"


@functools.lru_cache(maxsize=256)  # a handful of keys, scrubbed for every answer
def key_spellings(material: bytes) -> frozenset[bytes]:
    """The raw key and the ways a server may write it: base64 (padded or not, URL-safe, JSON-escaped,
    percent-encoded in either case) and hex."""
    b64 = base64.b64encode(material).decode().rstrip("=")
    url_quoted = quote(b64, safe="")
    spellings = {b64, base64.urlsafe_b64encode(material).decode().rstrip("="), b64.replace("/", "\\/"),
                 url_quoted, _lower_percent_escapes(url_quoted), material.hex(), material.hex().upper()}
    return frozenset({spelling.encode() for spelling in spellings} | {material})


def _lower_percent_escapes(text: str) -> str:
    return "%".join(part[:2].lower() + part[2:] if i else part for i, part in enumerate(text.split("%")))


def keys_in(headers: Iterable[tuple[str, str]], secret_names: Iterable[str]) -> list[bytes]:
    """The key material in a request's key headers (base64 as sent; the text itself if it is not base64)."""
    secret = {name.lower() for name in secret_names}
    found = []
    for name, value in headers:
        if name.lower() in secret and value:
            try:
                found.append(base64.b64decode(value.strip(), validate=True))
            except (binascii.Error, ValueError):
                found.append(value.encode("utf-8", "surrogateescape"))
    return found


def _mask(length: int) -> bytes:
    return (REDACTED.encode() + b"*" * length)[:length]


class KeyScrubber:
    """Scrubs the spellings of the given keys from headers and from a streamed body."""

    def __init__(self, keys: Iterable[bytes]):
        # Longest first, so a spelling is replaced whole before a shorter one inside it could be.
        self._spellings = sorted({s for key in keys for s in key_spellings(key)}, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._spellings)

    def scrub(self, data: bytes) -> bytes:
        for spelling in self._spellings:
            if spelling in data:
                data = data.replace(spelling, _mask(len(spelling)))
        return data

    def headers(self, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """Headers whose name or value holds a key get the value REDACTED."""
        headers = list(headers)
        lines = [f"{name}: {value}".encode("utf-8", "surrogateescape") for name, value in headers]
        every = b"\n".join(lines)
        if not any(spelling in every for spelling in self._spellings):
            return headers  # the usual answer: one look at all of it, not one per header
        return [(name, REDACTED if self.scrub(line) != line else value) for (name, value), line in zip(headers, lines)]

    def stream(self) -> Callable[[bytes], bytes]:
        """A stream transform (mitmproxy calls it per chunk, then with b"" at the end) that holds back
        just enough bytes to catch a spelling split between chunks."""
        held = b""
        hold = max(map(len, self._spellings), default=1) - 1

        def scrub_chunk(chunk: bytes) -> bytes:
            nonlocal held
            data = self.scrub(held + chunk)
            if not chunk:  # the end: nothing more can complete a spelling
                held = b""
                return data
            held = data[len(data) - hold:] if hold else b""
            return data[: len(data) - len(held)]

        return scrub_chunk
