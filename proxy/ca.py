"""An operator's own interception CA (cert-manager, a corporate PKI) instead of a generated one, written
where mitmproxy reads its CA: `mitmproxy-ca.pem` (key, then certificate and chain), `mitmproxy-ca-cert.pem`
(what clients trust) and `mitmproxy-dhparam.pem`."""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

CA_FILE, CA_CERT_FILE, DHPARAM_FILE = "mitmproxy-ca.pem", "mitmproxy-ca-cert.pem", "mitmproxy-dhparam.pem"


class CaError(ValueError):
    pass


def import_ca(cert_path: Path, key_path: Path, confdir: Path, dhparam: bytes) -> Path:
    """Checks that the certificate (first in `cert_path`; the rest is its chain) is a CA that may sign
    certificates, unexpired, and that `key_path` holds its private key; writes the confdir's files and
    returns the certificate clients must trust. Never replaces a CA already in `confdir`."""
    try:
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise CaError(f"cannot read {exc.filename}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:  # not PEM, or an encrypted key
        raise CaError(f"cannot load the CA certificate and key: {exc}") from None
    cert = chain[0]
    _check_is_ca(cert)
    if key.public_key().public_bytes(*_SPKI) != cert.public_key().public_bytes(*_SPKI):
        raise CaError(f"{key_path} is not the private key of the certificate in {cert_path}")
    if (confdir / CA_FILE).exists():
        raise CaError(f"{confdir / CA_FILE} exists: keycourier does not replace a CA; use an empty directory")
    confdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    _write(confdir / CA_FILE, key_pem + chain_pem, 0o600)
    _write(confdir / CA_CERT_FILE, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(confdir / DHPARAM_FILE, dhparam, 0o644)
    return confdir / CA_CERT_FILE


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_is_ca(cert: x509.Certificate) -> None:
    subject = cert.subject.rfc4514_string()
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CaError(f"{subject} is not a CA certificate (basicConstraints CA:TRUE is missing)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise CaError(f"{subject} may not sign certificates (keyUsage lacks keyCertSign)")
    if cert.not_valid_after_utc <= dt.datetime.now(dt.timezone.utc):
        raise CaError(f"{subject} expired on {cert.not_valid_after_utc:%Y-%m-%d}")


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
