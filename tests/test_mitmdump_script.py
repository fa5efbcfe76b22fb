"""addons/keycourier.py loaded by plain mitmdump, as mitmproxy users load scripts: it polices as `keycourier run`
does (judged at the upstream), keycourier decides the layers of object stores' connections, and the one setting it
cannot make safe in that order (saving flows) is refused with the reason."""
import base64
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, ProxyProcess, free_port
from tests.test_adversarial import Tunnel, request_bytes
from tests.test_pipeline import ACCESS_KEY, SECRET
from tests.upstreams.s3 import S3Upstream

KEY = os.urandom(32)
MITMDUMP = str(Path(sys.executable).with_name("mitmdump"))


@pytest.fixture(scope="module")
def s3(ca):
    with S3Upstream(ca, {ACCESS_KEY: SECRET}) as upstream:
        for bucket in ("enc-m", "deny-m"):
            upstream.create_bucket(bucket)
        yield upstream


def script_options(work: Path, s3: S3Upstream, ca_pem: Path, confdir: Path) -> list[str]:
    (work / "k.key").write_text(base64.b64encode(KEY).decode())
    (work / "app.yaml").write_text(f"access_key_id: {ACCESS_KEY}\nsecret_access_key: {SECRET}\n")
    for name in ("k.key", "app.yaml"):
        (work / name).chmod(0o600)
    (work / "policies.yaml").write_text(f"""version: 1
endpoints: [{{host: "127.0.0.1:{s3.port}", provider: s3}}]
keys: {{k: {{file: k.key}}}}
credentials: {{app: {{file: app.yaml, access_key_id: {ACCESS_KEY}}}}}
rules:
  - {{match: {{provider: s3, bucket: "enc-*"}}, action: encrypt, key: k}}
  - {{match: {{provider: "*"}}, action: deny}}
""")
    return ["-s", str(REPO / "addons" / "keycourier.py"), "--set", f"keycourier_policies={work / 'policies.yaml'}",
            "--set", f"confdir={confdir}", "--set", f"ssl_verify_upstream_trusted_ca={ca_pem}"]


def test_mitmdump_with_the_script_polices_like_keycourier_run(s3, ca_pem, keycourier_confdir, tmp_path):
    port = free_port()
    proxy = ProxyProcess("mitmdump", [MITMDUMP, "--listen-host", "127.0.0.1", "--listen-port", str(port),
                                      *script_options(tmp_path, s3, ca_pem, keycourier_confdir)],
                         port=port, log_path=tmp_path / "mitmdump.log")
    proxy.ca_cert = keycourier_confdir / "mitmproxy-ca-cert.pem"
    try:
        wire = request_bytes("PUT", "/enc-m/via-script", host="127.0.0.1", port=s3.port, body=b"script")
        # A request line split across TLS records: keycourier's layer decision, not mitmproxy's raw fallback.
        assert Tunnel(proxy, "127.0.0.1", s3.port).send(wire[:2], wire[2:]).response()[0] == 200
        assert s3.stored("enc-m", "via-script").sse_customer_key_md5 == \
            base64.b64encode(hashlib.md5(KEY).digest()).decode()
        deny = request_bytes("PUT", "/deny-m/x", host="127.0.0.1", port=s3.port, body=b"x")
        assert Tunnel(proxy, "127.0.0.1", s3.port).send(deny).response()[0] == 403
        assert not [r for r in s3.requests if r.path.startswith("/deny-m")]
        proxy.stop()
        assert "via-script" not in proxy.log()  # mitmdump's own flow lines are off: no object names
    finally:
        proxy.stop()


def test_saving_flows_from_the_script_is_refused_with_the_reason(s3, ca_pem, keycourier_confdir, tmp_path):
    result = subprocess.run([MITMDUMP, "--listen-port", str(free_port()), *script_options(tmp_path, s3, ca_pem, keycourier_confdir),
                             "--set", f"save_stream_file={tmp_path / 'flows'}"], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "use keycourier run --save-flows" in result.stdout + result.stderr
    assert not (tmp_path / "flows").exists() or base64.b64encode(KEY) not in (tmp_path / "flows").read_bytes()
