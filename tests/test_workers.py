"""keycourier run --workers: several proxy processes on one port behind one supervisor, judged from outside:
requests are encrypted at the upstream whichever worker takes them, /metrics sums every worker's, /readyz
follows the workers, a worker that dies is started again, SIGTERM stops them all cleanly."""
import base64
import hashlib
import os
import signal
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Keycourier, process_tree
from tests.test_adversarial import Tunnel, request_bytes
from tests.test_pipeline import ACCESS_KEY, SECRET
from tests.upstreams.s3 import S3Upstream

KEY = os.urandom(32)


@pytest.fixture(scope="module")
def s3(ca):
    with S3Upstream(ca, {ACCESS_KEY: SECRET}) as upstream:
        upstream.create_bucket("enc-w")
        yield upstream


@pytest.fixture
def workers(s3, ca_pem, keycourier_confdir, tmp_path):
    (tmp_path / "k.key").write_text(base64.b64encode(KEY).decode())
    (tmp_path / "app.yaml").write_text(f"access_key_id: {ACCESS_KEY}\nsecret_access_key: {SECRET}\n")
    for name in ("k.key", "app.yaml"):
        (tmp_path / name).chmod(0o600)
    running = Keycourier(tmp_path, keycourier_confdir, f"""version: 1
endpoints: [{{host: "127.0.0.1:{s3.port}", provider: s3}}]
keys: {{k: {{file: k.key}}}}
credentials: {{app: {{file: app.yaml, access_key_id: {ACCESS_KEY}}}}}
rules: [{{match: {{provider: s3, bucket: "enc-*"}}, action: encrypt, key: k}}]
""", upstream_ca=ca_pem, save_flows=False, args=("--workers", "2"))
    yield running
    running.stop()


def requests_total(proxy) -> float:
    families = text_string_to_metric_families(proxy.scrape()[1])
    return sum(sample.value for family in families if family.name == "keycourier_requests"
               for sample in family.samples if sample.name == "keycourier_requests_total")


def test_workers_share_the_port_and_their_metrics(workers, s3):
    workers.wait_ready()
    before = requests_total(workers)
    for n in range(12):  # a new connection each: the kernel spreads them over the workers
        wire = request_bytes("PUT", f"/enc-w/spread-{n}", host="127.0.0.1", port=s3.port, body=b"w")
        assert Tunnel(workers, "127.0.0.1", s3.port).send(wire).response()[0] == 200
        assert s3.stored("enc-w", f"spread-{n}").sse_customer_key_md5 == base64.b64encode(hashlib.md5(KEY).digest()).decode()
    assert requests_total(workers) - before == 12  # every worker's requests, in the one /metrics
    assert workers.log().count("HTTP(S) proxy listening") == 2


def test_a_dead_worker_is_started_again_and_sigterm_stops_all(workers, s3):
    workers.wait_ready()
    children = process_tree(workers.process.pid)[1:]
    assert len(children) == 2
    os.kill(children[0], signal.SIGKILL)
    time.sleep(0.5)
    assert workers.scrape("/readyz")[0] == 503
    workers.wait_ready()
    wire = request_bytes("PUT", "/enc-w/after-restart", host="127.0.0.1", port=s3.port, body=b"w")
    assert Tunnel(workers, "127.0.0.1", s3.port).send(wire).response()[0] == 200
    children = process_tree(workers.process.pid)[1:]
    workers.process.send_signal(signal.SIGTERM)
    assert workers.process.wait(30) == 0
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]  # no worker left behind
