"""Azure Storage Shared Key for the Blob service: check what the client signed, and sign again once
keycourier has added its headers (Shared Key covers every x-ms-* header, so adding the
customer-provided-key headers breaks the client's signature).

Each step is a function named after the step in Microsoft's "Authorize with Shared Key" article, over
the plain `Request` of proxy.message; docs/azure-sharedkey.md lists the rules relied on and where
they are stated. The interface mirrors keycourier.signers.s3 so the pipeline can treat signers alike.

Shared access signatures (`sig=` in the query) and Microsoft Entra bearer tokens sign no x-ms-*
header, so headers can be added to such requests as they are: they are recognised, left unchecked
(keycourier holds neither the key a SAS was made with nor Entra's keys; the service checks them) and
forwarded unchanged. Shared Key Lite (the pre-2009 string to sign, still accepted) is checked and
signed again the same way as Shared Key, each with its own string to sign.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal
from urllib.parse import quote, unquote

from keycourier.message import Request
from keycourier.signers.common import SignatureError, parse_http_date, with_authorization

SCHEME = "SharedKey"
LITE_SCHEME = "SharedKeyLite"
BEARER_SCHEME = "bearer"  # auth schemes are case-insensitive (RFC 9110); compared lowercased
SAS_SIGNATURE_PARAMETER = "sig"
_SCHEMES = {"sharedkey": SCHEME, "sharedkeylite": LITE_SCHEME}  # style: Authorization scheme

MAX_CLOCK_SKEW = timedelta(minutes=15)
# From this x-ms-version on, a Content-Length of 0 is signed as an empty line.
EMPTY_ZERO_LENGTH_VERSION = "2015-02-21"
# From this x-ms-version on, an x-ms-* header with an empty value is signed as 'name:'.
EMPTY_HEADERS_SIGNED_VERSION = "2016-05-31"
# The standard headers' lines of the string to sign, in order, after the verb. Date is signed as sent,
# even beside x-ms-date, as the SDK does (`verify` also accepts it left empty: docs/azure-sharedkey.md).
STANDARD_HEADERS = (
    "content-encoding", "content-language", "content-length", "content-md5", "content-type", "date",
    "if-modified-since", "if-match", "if-none-match", "if-unmodified-since", "range",
)
LITE_STANDARD_HEADERS = ("content-md5", "content-type", "date")

# The service sorts header names with a culture-aware collation, not by code point (docs/azure-sharedkey.md):
# letters case-insensitively after digits, after these symbols in this order; "'" and "-" are
# ignored at first and only break ties, position by position.
_PRIMARY_ORDER = "!#$%&*.^_`|~+0123456789abcdefghijklmnopqrstuvwxyz"
_PRIMARY_WEIGHT = {char: weight for weight, char in enumerate(_PRIMARY_ORDER)}
_TIE_BREAKERS = "'-"

_CREDENTIAL = re.compile(r"([^\s:]+):(\S+)")
_SIGNATURE = re.compile(r"[A-Za-z0-9+/]{43}=")  # base64 of a 32-byte HMAC-SHA256
_ACCOUNT_HOST = re.compile(r"(?P<account>[a-z0-9]+)\.blob\.", re.IGNORECASE)


@dataclass(frozen=True)
class SharedKeySignature:
    """How the client authorized the request."""

    style: Literal["sharedkey", "sharedkeylite", "sas", "bearer"]
    access_key_id: str  # the storage account name (credentials are keyed by it)
    signature: str  # base64 HMAC-SHA256 (Shared Key, Lite), the SAS `sig`, or "" for a bearer token


# --- Reading the client's signature -------------------------------------------------------------

def read_signature(request: Request) -> SharedKeySignature | None:
    """The authorization the request carries; None if it carries none (anonymous)."""
    authorizations = [value for name, value in request.headers if name.lower() == "authorization"]
    sas_signatures = [value for name, value in request.query if name == SAS_SIGNATURE_PARAMETER]
    if authorizations and sas_signatures:
        raise SignatureError("only one auth mechanism allowed")
    if len(authorizations) > 1:
        raise SignatureError("more than one Authorization header")
    if len(sas_signatures) > 1:
        raise SignatureError("sig given more than once")
    if authorizations:
        return _read_authorization_header(request, authorizations[0])
    if sas_signatures:
        return SharedKeySignature("sas", _account_from_url(request), sas_signatures[0])
    return None


def _read_authorization_header(request: Request, value: str) -> SharedKeySignature:
    scheme, _, credential = value.strip().partition(" ")
    if scheme.lower() == BEARER_SCHEME:
        # The token is a credential in itself: kept out of an object that may end up in logs.
        return SharedKeySignature("bearer", _account_from_url(request), "")
    style = next((style for style, name in _SCHEMES.items() if name == scheme), None)
    if style is None:
        raise SignatureError("unsupported authorization scheme")
    match = _CREDENTIAL.fullmatch(credential.strip())
    if not match:
        raise SignatureError("malformed Authorization header")
    if not _SIGNATURE.fullmatch(match[2]):
        raise SignatureError("malformed signature")
    return SharedKeySignature(style, match[1], match[2])


def _account_from_url(request: Request) -> str:
    """The account a SAS or bearer request addresses: `<account>.blob.…` host, else the first path
    segment (emulator style); "" if neither names one."""
    match = _ACCOUNT_HOST.match(request.header("host") or request.host)
    if match:
        return match["account"]
    return unquote(request.path.lstrip("/").partition("/")[0])


# --- Verifying and re-signing -------------------------------------------------------------------

def verify(request: Request, signature: SharedKeySignature, secret_access_key: str,
           now: datetime) -> None:
    """Raise SignatureError unless `signature` is the client's valid Shared Key (or Lite) signature of
    `request` at `now` (timezone-aware), `secret_access_key` being the account's base64 key.

    SAS and bearer requests pass unchecked: keycourier cannot check them without the key or token
    issuer, and the service checks them itself.
    """
    if signature.style not in _SCHEMES:
        return
    _check_time(request, now)
    forms = [request]
    if request.header("x-ms-date") is not None and request.header("date") is not None:
        # With x-ms-date set, a client may sign Date's line empty even though it sends Date.
        forms.append(request.with_header_map({"Date": None}))
    expected = (_request_signature(form, signature, secret_access_key) for form in forms)
    if not any(hmac.compare_digest(candidate, signature.signature) for candidate in expected):
        raise SignatureError("signature does not match")


def resign(request: Request, signature: SharedKeySignature, secret_access_key: str, *,
           added_headers: Iterable[str], region: str | None = None,
           now: datetime | None = None) -> tuple[Request, str]:
    """`request` signed again over its current headers; returns it with the new signature.

    `added_headers`, `region` and `now` are taken for the signers' common interface only: Shared Key
    (and Lite) signs every x-ms-* header whatever was added, has no region, and keeps the client's date.
    SAS and bearer requests sign no x-ms-* header and are returned unchanged.
    """
    if signature.style not in _SCHEMES:
        return request, signature.signature
    new_signature = _request_signature(request, signature, secret_access_key)
    value = f"{_SCHEMES[signature.style]} {signature.access_key_id}:{new_signature}"
    return with_authorization(request, value), new_signature


def body_resigner(signature: SharedKeySignature, secret_access_key: str,
                  new_seed_signature: str) -> None:
    """None: Azure signs no part of the body, so its bytes never change."""
    return None


def _request_signature(request: Request, signature: SharedKeySignature, secret_access_key: str) -> str:
    build = lite_string_to_sign if signature.style == "sharedkeylite" else string_to_sign
    return shared_key_signature(secret_access_key, build(request, signature.access_key_id))


def _check_time(request: Request, now: datetime) -> None:
    # x-ms-date wins over Date: clients that cannot set Date send it.
    value = request.header("x-ms-date")
    if value is None:
        value = request.header("date")
    if value is None:
        raise SignatureError("missing x-ms-date or Date header")
    if abs(now - parse_http_date(value)) > MAX_CLOCK_SKEW:
        raise SignatureError("request time too skewed")


# --- The signing steps --------------------------------------------------------------------------

def string_to_sign(request: Request, account: str) -> str:
    """VERB, then one line per standard header (empty when absent), then CanonicalizedHeaders and
    CanonicalizedResource."""
    lines = [request.method, *(_standard_header_value(request, name) for name in STANDARD_HEADERS)]
    return ("".join(f"{line}\n" for line in lines) + canonicalized_headers(request)
            + canonicalized_resource(request, account))


def _standard_header_value(request: Request, name: str) -> str:
    value = _single_header(request, name) or ""
    if name == "content-length" and value == "0" and _version_at_least(request, EMPTY_ZERO_LENGTH_VERSION):
        return ""
    return value


def canonicalized_headers(request: Request) -> str:
    """'name:value\\n' for every x-ms-* header: names lowercased and sorted as the service sorts them,
    values trimmed, each given once. Before version 2016-05-31 a header with an empty value is left out."""
    names = {name.lower() for name, _ in request.headers if name.lower().startswith("x-ms-")}
    values = {name: _single_header(request, name).strip() for name in names}
    if not _version_at_least(request, EMPTY_HEADERS_SIGNED_VERSION):
        values = {name: value for name, value in values.items() if value}
    return "".join(f"{name}:{values[name]}\n" for name in sorted(values, key=header_sort_key))


def _single_header(request: Request, name: str) -> str | None:
    # The service answers a signed header given twice with 400; refusing it keeps the two views equal.
    values = [value for field, value in request.headers if field.lower() == name]
    if len(values) > 1:
        raise SignatureError(f"header given more than once: {name}")
    return values[0] if values else None


def _version_at_least(request: Request, version: str) -> bool:
    """Whether the request's x-ms-version is `version` or later (no x-ms-version: the latest)."""
    requested = request.header("x-ms-version")
    return requested is None or requested >= version  # ISO dates compare as text


def header_sort_key(name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The service's order of lowercase header names: by their other characters first, then by
    where "'" and '-' stand (a name with one where the other has a letter sorts after it)."""
    try:
        primary = tuple(_PRIMARY_WEIGHT[char] for char in name if char not in _TIE_BREAKERS)
    except KeyError:
        raise SignatureError("unsupported character in an x-ms-* header name") from None
    return primary, tuple(_TIE_BREAKERS.find(char) + 1 for char in name)


def canonicalized_resource(request: Request, account: str) -> str:
    """'/<account>' and the encoded path as sent, then '\\n<name>:<value>' for each query parameter.

    The path is taken whole, so an emulator-style path (account first) names the account twice.
    Names are decoded and lowercased, values decoded; a name given more than once lists its values
    sorted and joined with ','. Parameters are sorted by name.
    """
    values: dict[str, list[str]] = {}
    for part in request.raw_query.split("&"):
        if part:
            raw_name, _, raw_value = part.partition("=")
            values.setdefault(unquote(raw_name).lower(), []).append(unquote(raw_value))
    query = "".join(f"\n{name}:{','.join(sorted(values[name]))}" for name in sorted(values))
    return f"/{account}{request.path}{query}"


def lite_string_to_sign(request: Request, account: str) -> str:
    """Shared Key Lite: VERB, Content-MD5, Content-Type and Date lines, then CanonicalizedHeaders and
    the Lite CanonicalizedResource."""
    lines = [request.method, *(_standard_header_value(request, name) for name in LITE_STANDARD_HEADERS)]
    return ("".join(f"{line}\n" for line in lines) + canonicalized_headers(request)
            + lite_canonicalized_resource(request, account))


def lite_canonicalized_resource(request: Request, account: str) -> str:
    """'/<account>' and the encoded path as sent, then '?comp=<value>' if the query names a component;
    no other query parameter is signed."""
    comp = [value for name, value in request.query if name == "comp"]
    if len(comp) > 1:
        raise SignatureError("comp given more than once")
    return f"/{account}{request.path}" + "".join(f"?comp={value}" for value in comp)


def shared_key_signature(secret_access_key: str, string_to_sign: str) -> str:
    """Base64(HMAC-SHA256(base64-decoded account key, UTF-8 string to sign))."""
    key = base64.b64decode(secret_access_key, validate=True)
    return base64.b64encode(hmac.new(key, string_to_sign.encode(), hashlib.sha256).digest()).decode()


SAS_VERSION = "2020-12-06"


def blob_sas(account: str, account_key: str, container: str, blob: str, permissions: str, expiry) -> str:
    """A blob service SAS query string (https only), for version 2020-12-06 and later: Microsoft's "Create a
    service SAS", string to sign with the encryption scope line (docs/azure-sharedkey.md)."""
    expires = expiry.strftime("%Y-%m-%dT%H:%M:%SZ")
    fields = [permissions, "", expires, f"/blob/{account}/{container}/{blob}", "", "", "https", SAS_VERSION, "b", "", "",
              "", "", "", "", ""]
    signature = shared_key_signature(account_key, "\n".join(fields))
    return "&".join(f"{name}={quote(value, safe='')}" for name, value in (
        ("sv", SAS_VERSION), ("se", expires), ("sr", "b"), ("sp", permissions), ("spr", "https"), ("sig", signature)))


# SAS and bearer tokens sign no x-ms-* header: the service checks them, keycourier re-signs nothing.
HEADERLESS_STYLES = frozenset({"sas", "bearer"})
