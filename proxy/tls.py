"""TLS rules: key material only travels over TLS, and upstream certificates are always verified."""
from __future__ import annotations

import ssl
from pathlib import Path

import certifi

from keycourier.message import Request
from keycourier.refusals import Refused


def check_tls(request: Request, *, client_tls: bool, client_sends_key: bool, injects_key: bool) -> None:
    """Refuses a request that would carry key material over plain HTTP, on either side."""
    if client_sends_key and not client_tls:
        raise Refused(400, "InvalidRequest", "key headers must not travel over plain HTTP; connect to keycourier over TLS", "tls")
    if (client_sends_key or injects_key) and request.scheme != "https":
        raise Refused(403, "AccessDenied", f"refusing to send key material to http://{request.authority}: keys only travel over verified TLS", "tls")


def upstream_context(trusted_ca: str | None) -> ssl.SSLContext:
    """TLS to an upstream, verified as mitmproxy verifies it: against `trusted_ca` (keycourier's bundle)."""
    return ssl.create_default_context(cafile=trusted_ca or certifi.where())


def upstream_trust_bundle(extra_ca: Path | None, directory: Path) -> Path:
    """The CAs upstream certificates are verified against: the public ones, plus `extra_ca`.

    mitmproxy trusts only the file it is given, so the public bundle is copied in rather than replaced.
    It is written to `directory` (a private temporary one the caller removes): the confdir may be a
    read-only Secret mount.
    """
    bundle = directory / "upstream-trust.pem"
    pems = [Path(certifi.where()).read_text()]
    if extra_ca:
        pems.append(extra_ca.read_text())
    bundle.write_text("\n".join(pems))
    return bundle
