"""`keycourier run` as a container runs it: JSON log lines only, and a SIGTERM that drains instead of cutting
requests off. The real process, a strict S3 upstream, boto3 and raw sockets, all on 127.0.0.1."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import socket
import ssl
import threading
import time

import boto3
import pytest
from botocore.config import Config

from tests.conftest import Keycourier
from tests.upstreams.s3 import S3Upstream

ACCESS_KEY, SECRET = "AKIAKEYCOURIERRUN001", "run/SecretAccessKey+ForTheTestsOnly00000001"
KEY = os.urandom(32)
MB = 1000 * 1000
DRAIN_SECONDS = 20


@pytest.fixture(scope="module")
def s3(ca):
    with S3Upstream(ca, {ACCESS_KEY: SECRET}) as upstream:
        upstream.create_bucket("secure-run")
        upstream.create_bucket("other-run")
        yield upstream


def start(tmp_path, s3, ca_pem, confdir, *args: str) -> Keycourier:
    (tmp_path / "k.key").write_text(base64.b64encode(KEY).decode())
    (tmp_path / "app.yaml").write_text(f"access_key_id: {ACCESS_KEY}\nsecret_access_key: {SECRET}\n")
    for secret in ("k.key", "app.yaml"):
        (tmp_path / secret).chmod(0o600)
    policy = f"""
version: 1
endpoints:
  - {{host: "127.0.0.1:{s3.port}", provider: s3}}
keys:
  k: {{file: k.key}}
  gone: {{file: gone.key}}
credentials:
  app: {{file: app.yaml}}
rules:
  - {{name: secure, match: {{provider: s3, bucket: "secure-*"}}, action: encrypt, key: k}}
  - {{match: {{provider: "*"}}, action: deny}}
"""
    # TMPDIR: the run's private files (the upstream trust bundle) must be gone once it exits.
    return Keycourier(tmp_path, confdir, policy, upstream_ca=ca_pem, save_flows=False, args=args,
                      env={"TMPDIR": str(tmp_path / "tmp")})


def client(proxy: Keycourier, s3):
    return boto3.session.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET).client(
        "s3", endpoint_url=s3.endpoint_url, region_name="us-east-1", verify=str(proxy.ca_cert),
        config=Config(retries={"total_max_attempts": 1}, proxies={"https": proxy.url}, s3={"addressing_style": "path"}))


def terminate(proxy: Keycourier, timeout: float) -> tuple[int, float]:
    started = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    code = proxy.process.wait(timeout)
    return code, time.monotonic() - started


def test_json_logs_hold_one_object_a_line_for_every_line(tmp_path, s3, ca_pem, keycourier_confdir):
    (tmp_path / "tmp").mkdir()
    proxy = start(tmp_path, s3, ca_pem, keycourier_confdir, "--log-format", "json")
    try:
        app = client(proxy, s3)
        app.put_object(Bucket="secure-run", Key="a.txt", Body=b"hello")
        with pytest.raises(Exception):
            app.put_object(Bucket="other-run", Key="b.txt", Body=b"refused")
        with socket.create_connection(("127.0.0.1", proxy.port)) as raw:  # not HTTP: a protocol error
            raw.sendall(b"\x00\x01 garbage 'secret-name'\r\n\r\n")
            raw.recv(1000)
        proxy.wait_for_log('"status":403')
        code, _ = terminate(proxy, 30)
    finally:
        proxy.stop()
    lines = proxy.log().splitlines()
    entries = [json.loads(line) for line in lines]  # every line parses, mitmproxy's own included
    assert code == 0 and len(entries) == len(lines) >= 6
    assert all({"time", "level", "logger"} <= entry.keys() for entry in entries)
    audits = [entry for entry in entries if entry.get("event") == "audit"]
    assert [(a["bucket"], a["rule"], a["outcome"], a["status"]) for a in audits] == [
        ("secure-run", "secure", "forwarded", 200), ("other-run", "rule12", "refused", 403)]
    assert audits[0]["key_fingerprint"] == base64.b64encode(hashlib.md5(KEY).digest()).decode()
    assert any(e["logger"].startswith("mitmproxy") and e["level"] == "info" for e in entries)  # "listening at"
    warning = [e["message"] for e in entries if e["level"] == "warning" and "gone.key" in e.get("message", "")]
    assert len(warning) == 1  # one line at start for the key it cannot read
    text = proxy.log()
    assert "client connect" not in text and "server connect" not in text and "secret-name" not in text
    assert "[details withheld by keycourier]" in text  # the protocol error, logged without the bytes
    assert list((tmp_path / "tmp").iterdir()) == []


def test_verbose_brings_back_connection_lines(tmp_path, s3, ca_pem, keycourier_confdir):
    proxy = start(tmp_path, s3, ca_pem, keycourier_confdir, "--verbose")
    try:
        client(proxy, s3).put_object(Bucket="secure-run", Key="v.txt", Body=b"v")
        proxy.wait_for_log("client disconnect")
    finally:
        proxy.stop()
    assert "server connect" in proxy.log()


def test_mitmproxys_own_apps_are_not_served(tmp_path, s3, ca_pem, keycourier_confdir):
    """keycourier run loads only the mitmproxy addons it needs (keycourier.addons.chain): mitmproxy's onboarding
    app, which would answer http://mitm.it/ itself, is not one of them."""
    proxy = start(tmp_path, s3, ca_pem, keycourier_confdir)
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
            raw.sendall(b"GET http://mitm.it/cert/pem HTTP/1.1\r\nHost: mitm.it\r\nConnection: close\r\n\r\n")
            answer = b""
            while piece := raw.recv(65536):
                answer += piece
    finally:
        proxy.stop()
    assert answer.startswith(b"HTTP/1.1 502")  # forwarded as to any host, which does not resolve here
    assert b"BEGIN CERTIFICATE" not in answer


class SlowBody(io.RawIOBase):
    """`size` bytes at about `rate` bytes/s, counting what was read: an upload that lasts seconds."""

    def __init__(self, size: int, rate: float):
        self.size, self.rate, self.position = size, rate, 0
        self.chunk = os.urandom(1024 * 1024)

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=io.SEEK_SET):
        self.position = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence] + offset
        return self.position

    def tell(self):
        return self.position

    def readinto(self, buffer):
        n = min(len(buffer), len(self.chunk), self.size - self.position)
        buffer[:n] = self.chunk[:n]
        self.position += n
        time.sleep(n / self.rate)
        return n


def test_sigterm_lets_a_large_upload_finish_then_exits_0(tmp_path, s3, ca_pem, keycourier_confdir):
    proxy = start(tmp_path, s3, ca_pem, keycourier_confdir, "--drain-seconds", str(DRAIN_SECONDS))
    body = SlowBody(200 * MB, rate=40 * MB)  # about 5 s
    outcome = {}

    def upload():
        try:
            outcome["etag"] = client(proxy, s3).put_object(Bucket="secure-run", Key="big.bin", Body=body)["ETag"]
        except Exception as exc:  # reported below
            outcome["error"] = exc

    uploader = threading.Thread(target=upload)
    try:
        assert proxy.scrape("/readyz")[0] == 200
        uploader.start()
        while body.position < 40 * MB:
            time.sleep(0.05)
        proxy.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        proxy.wait_for_log("stopping: no new connections")
        assert proxy.scrape("/readyz") == (503, "stopping: draining requests in flight\n")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        assert body.position < 200 * MB  # the upload was still under way
        uploader.join(DRAIN_SECONDS)
        code = proxy.process.wait(DRAIN_SECONDS)
        waited = time.monotonic() - signalled
    finally:
        proxy.stop()
    assert "error" not in outcome, outcome
    stored = s3.stored("secure-run", "big.bin")
    assert stored.size == 200 * MB and stored.sse_customer_key_md5 == base64.b64encode(hashlib.md5(KEY).digest()).decode()
    assert code == 0 and waited < DRAIN_SECONDS
    assert "stopping: no request in flight" in proxy.log()


def test_drain_is_bounded(tmp_path, s3, ca_pem, keycourier_confdir):
    """A request that would outlast the drain period is cut off when the period ends."""
    proxy = start(tmp_path, s3, ca_pem, keycourier_confdir, "--drain-seconds", "1")
    try:
        raw = socket.create_connection(("127.0.0.1", proxy.port))
        raw.sendall(f"CONNECT 127.0.0.1:{s3.port} HTTP/1.1\r\nHost: 127.0.0.1:{s3.port}\r\n\r\n".encode())
        assert raw.recv(1000).startswith(b"HTTP/1.1 200")
        tls = ssl.create_default_context(cafile=str(proxy.ca_cert)).wrap_socket(raw, server_hostname="127.0.0.1")
        tls.sendall(b"PUT /secure-run/never.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n"
                    b"x-amz-content-sha256: UNSIGNED-PAYLOAD\r\n\r\npartial")
        time.sleep(0.5)  # for keycourier to read the headers: the request is in flight, its body unfinished
        code, took = terminate(proxy, 10)
        tls.close()
    finally:
        proxy.stop()
    assert code == 0 and 1 <= took < 5
    assert "waiting up to 1s for 1 requests in flight" in proxy.log()
    assert "drain period over: exiting with 1 requests unfinished" in proxy.log()
