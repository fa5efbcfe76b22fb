"""An operator's own CA (`keycourier ca --import`): keycourier intercepts with it, and a client that trusts
only that CA talks to an object store through keycourier. A certificate that is no CA is refused."""
from __future__ import annotations

import datetime as dt
import stat
import subprocess
import sys

import pytest
import requests
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import Keycourier
from tests.upstreams.s3 import S3Upstream


def keycourier(*args):
    return subprocess.run([sys.executable, "-m", "keycourier.cli", "ca", *map(str, args)], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def operator_ca(tmp_path):
    """As cert-manager stores a CA Certificate: tls.crt (the CA) and tls.key (its key)."""
    ca = trustme.CA(organization_name="Example Corp interception CA")
    ca.cert_pem.write_to_path(str(tmp_path / "tls.crt"))
    ca.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    return ca


def test_imported_ca_is_what_clients_trusting_only_it_see(tmp_path, operator_ca, ca, ca_pem):
    confdir = tmp_path / "confdir"
    imported = keycourier("--import", tmp_path / "tls.crt", tmp_path / "tls.key", "--confdir", confdir)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == str(confdir / "mitmproxy-ca-cert.pem")
    assert stat.S_IMODE((confdir / "mitmproxy-ca.pem").stat().st_mode) == 0o600
    assert (confdir / "mitmproxy-ca-cert.pem").read_bytes() == operator_ca.cert_pem.bytes()
    assert keycourier("--confdir", confdir).stdout == imported.stdout  # used as it is, not replaced

    with S3Upstream(ca, {}) as s3:
        policy = f"""
version: 1
endpoints: [{{host: "127.0.0.1:{s3.port}", provider: s3}}]
rules: [{{match: {{provider: "*"}}, action: passthrough}}]
"""
        proxy = Keycourier(tmp_path, confdir, policy, upstream_ca=ca_pem, save_flows=False)
        try:
            trusting_only_it = tmp_path / "client-trust.pem"
            operator_ca.cert_pem.write_to_path(str(trusting_only_it))
            answer = requests.get(f"{s3.endpoint_url}/", proxies={"https": proxy.url}, verify=str(trusting_only_it),
                                  timeout=10)
            assert answer.status_code == 403 and answer.headers["server"] == "AmazonS3"  # S3's own answer (unsigned)
            with pytest.raises(requests.exceptions.SSLError):  # the public CAs do not vouch for it
                requests.get(f"{s3.endpoint_url}/", proxies={"https": proxy.url}, timeout=10)
        finally:
            proxy.stop()


def test_a_certificate_that_is_no_ca_is_refused(tmp_path, operator_ca):
    leaf = operator_ca.issue_cert("s3.example.net")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "leaf.crt"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "leaf.key"))
    refused = keycourier("--import", tmp_path / "leaf.crt", tmp_path / "leaf.key", "--confdir", tmp_path / "c")
    assert refused.returncode == 1 and "is not a CA certificate" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1 and not (tmp_path / "c").exists()


def test_a_key_that_is_not_the_cas_is_refused(tmp_path, operator_ca):
    trustme.CA().private_key_pem.write_to_path(str(tmp_path / "other.key"))
    refused = keycourier("--import", tmp_path / "tls.crt", tmp_path / "other.key", "--confdir", tmp_path / "c")
    assert refused.returncode == 1 and "is not the private key of the certificate" in refused.stderr


def test_a_ca_that_may_not_sign_certificates_is_refused(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "no-signing")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    refused = keycourier("--import", tmp_path / "ca.crt", tmp_path / "ca.key", "--confdir", tmp_path / "c")
    assert refused.returncode == 1 and "keyUsage lacks keyCertSign" in refused.stderr


def test_an_existing_ca_is_never_replaced(tmp_path, operator_ca):
    confdir = tmp_path / "confdir"
    keycourier("--confdir", confdir)
    before = (confdir / "mitmproxy-ca.pem").read_bytes()
    refused = keycourier("--import", tmp_path / "tls.crt", tmp_path / "tls.key", "--confdir", confdir)
    assert refused.returncode == 1 and "does not replace a CA" in refused.stderr
    assert (confdir / "mitmproxy-ca.pem").read_bytes() == before
