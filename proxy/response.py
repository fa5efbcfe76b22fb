"""The way back: explain provider errors in plain words, and scrub key material from what is kept."""
from __future__ import annotations

import re

from keycourier.pipeline import DIALECTS, Audit, RespondAs
from keycourier.scrub import REDACTED
ERROR_BODY_LIMIT = 64 * 1024  # provider error documents are far smaller

_ERROR_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")


def header_safe(text: str, limit: int = 512) -> str:
    """Printable ASCII only: messages quote client input (object keys), which must not split headers."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])


def redact_headers(headers: tuple[tuple[str, str], ...], secret_names) -> list[tuple[str, str]]:
    secret = {name.lower() for name in secret_names}
    return [(name, REDACTED if name.lower() in secret else value) for name, value in headers]


def translate_response(headers: list[tuple[str, str]], provider: str, respond_as: RespondAs) -> list[tuple[str, str]]:
    """The provider's answer about the customer key, said in the dialect the client spoke: e.g. Azure's
    x-ms-encryption-key-sha256 becomes S3's SSE-C algorithm and key-MD5 headers."""
    upstream_names = {name.lower() for name in DIALECTS[provider].RESPONSE_KEY_HEADERS}
    kept = [(name, value) for name, value in headers if name.lower() not in upstream_names]
    if len(kept) == len(headers):
        return headers  # the provider said nothing about a key: neither does the translation
    spoken = DIALECTS[respond_as.dialect].response_key_headers(respond_as.md5_b64, respond_as.sha256_b64, respond_as.write)
    return kept + list(spoken.items())


def explain_upstream_error(audit: Audit, status: int, body: bytes) -> str | None:
    """A log line saying why the provider refused a request keycourier forwarded, when it is known."""
    found = _ERROR_CODE.search(body)
    code = found.group(1).decode("ascii", "replace") if found else None
    explanation = DIALECTS[audit.provider].explain_error(status, code, audit)
    if explanation:
        return f"{audit.provider} refused {audit.operation} on bucket {audit.bucket} ({status} {code or ''}): {explanation}"
    return None
