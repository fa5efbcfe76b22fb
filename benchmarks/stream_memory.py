"""Streams a large object through the real keycourier process and prints throughput and its memory.

    .venv/bin/python benchmarks/stream_memory.py [--gib 2]

An encrypt rule covers the bucket, so each request is classified, given its key, re-signed and forwarded.
The upstream is a sink on 127.0.0.1 that discards uploads and serves downloads of the same size.
Last, the same upload to a denied bucket: keycourier refuses it without holding the body.
"""
from __future__ import annotations

import argparse
import base64
import os
import ssl
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
import trustme
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import Keycourier  # noqa: E402

ACCESS_KEY, SECRET = "AKIABENCHMARK", "benchmark-secret"
PIECE = 1024 * 1024


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    size = 0

    def do_PUT(self):
        remaining = int(self.headers["content-length"])
        while remaining:
            remaining -= len(self.rfile.read(min(remaining, PIECE)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", str(self.size))
        self.end_headers()
        piece = b"\0" * PIECE
        for _ in range(self.size // PIECE):
            self.wfile.write(piece)

    def log_message(self, *args):
        pass


class Upload:
    """A body of known length that is never held in memory (requests sends it with Content-Length)."""

    def __init__(self, size: int):
        self.remaining = size
        self.piece = b"\x5a" * PIECE

    def __len__(self) -> int:
        return self.remaining

    def read(self, amount: int = -1) -> bytes:
        piece = self.piece[: min(self.remaining, PIECE if amount < 0 else amount)]
        self.remaining -= len(piece)
        return piece


def memory_kib(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def signed_headers(method: str, url: str) -> dict[str, str]:
    request = AWSRequest(method=method, url=url, headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
    S3SigV4Auth(Credentials(ACCESS_KEY, SECRET), "s3", "us-east-1").add_auth(request)
    return dict(request.headers)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=2.0)
    size = int(parser.parse_args().gib * 1024) * PIECE
    work = Path(tempfile.mkdtemp(prefix="kc-bench-"))
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    Sink.size = size
    sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    sink.socket = context.wrap_socket(sink.socket, server_side=True)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    port = sink.server_address[1]

    (work / "bench.key").write_text(base64.b64encode(os.urandom(32)).decode())
    (work / "app.yaml").write_text(f"access_key_id: {ACCESS_KEY}\nsecret_access_key: {SECRET}\n")
    for name in ("bench.key", "app.yaml"):
        (work / name).chmod(0o600)
    policy = f"""version: 1
endpoints: [{{host: "127.0.0.1:{port}", provider: s3}}]
keys: {{bench: {{file: {work}/bench.key}}}}
credentials: {{app: {{file: {work}/app.yaml}}}}
rules:
  - {{match: {{provider: s3, bucket: bench}}, action: encrypt, key: bench}}
  - {{match: {{provider: s3}}, action: deny}}
"""
    (work / "conf").mkdir()
    proxy = Keycourier(work, work / "conf", policy, upstream_ca=work / "ca.pem")
    proxy.flows_path.unlink(missing_ok=True)
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would otherwise replace the CA given here
    session.proxies = {"https": proxy.url}
    session.verify = str(proxy.ca_cert)
    url = f"https://127.0.0.1:{port}/bench/object.bin"
    try:
        print(f"keycourier at start: RSS {memory_kib(proxy.process.pid)['VmRSS'] / 1024:.0f} MiB")

        start = time.monotonic()
        response = session.put(url, data=Upload(size), headers=signed_headers("PUT", url), timeout=600)
        upload_seconds = time.monotonic() - start
        assert response.status_code == 200, response.text
        print(f"PUT {size / 2**30:.1f} GiB: {size / upload_seconds / 2**20:.0f} MiB/s, "
              f"keycourier peak RSS {memory_kib(proxy.process.pid)['VmHWM'] / 1024:.0f} MiB")

        start = time.monotonic()
        received = 0
        with session.get(url, headers=signed_headers("GET", url), stream=True, timeout=600) as response:
            assert response.status_code == 200, response.text
            for piece in response.iter_content(PIECE):
                received += len(piece)
        assert received == size
        download_seconds = time.monotonic() - start
        print(f"GET {size / 2**30:.1f} GiB: {size / download_seconds / 2**20:.0f} MiB/s, "
              f"keycourier peak RSS {memory_kib(proxy.process.pid)['VmHWM'] / 1024:.0f} MiB")

        denied = f"https://127.0.0.1:{port}/denied/object.bin"
        start = time.monotonic()
        response = session.put(denied, data=Upload(size), headers=signed_headers("PUT", denied), timeout=600)
        assert response.status_code == 403, response.text
        print(f"refused PUT {size / 2**30:.1f} GiB (deny rule): answered 403 after {time.monotonic() - start:.1f} s, "
              f"keycourier peak RSS {memory_kib(proxy.process.pid)['VmHWM'] / 1024:.0f} MiB")
    finally:
        proxy.stop()
        sink.shutdown()


if __name__ == "__main__":
    main()
