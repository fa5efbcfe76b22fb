"""What the benchmarks share: a TLS sink upstream on 127.0.0.1, bodies that are never held in memory,
SigV4 signing as a client does it, the benchmark's key, credentials and policy, and a proxy's CPU time
and memory read from /proc over its whole process tree."""
from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import trustme
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from tests.conftest import process_tree
from tests.upstreams.s3 import S3Upstream
from tests.upstreams.server import ResponseWriter, TestServer

ACCESS_KEY, SECRET = "AKIABENCHMARK", "benchmark-secret"
PIECE = 1024 * 1024
UNSIGNED_PAYLOAD = Config(s3={"payload_signing_enabled": False})


class SinkHandler(ResponseWriter, BaseHTTPRequestHandler):
    """Discards uploads; serves downloads of the owner's `size` in zeros, with the user metadata (x-*-meta-*
    headers) of the last upload, as a store would: envelope encryption needs its metadata back to decrypt."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # the GET header is a write of its own: no wait for a delayed ACK

    def do_PUT(self):
        self.server.owner.metadata = [(name, value) for name, value in self.headers.items()
                                      if name.lower().startswith("x-") and "-meta-" in name.lower()]
        remaining = int(self.headers["content-length"])
        while remaining:
            remaining -= len(self.rfile.read(min(remaining, PIECE)))
        self.write_response(200, [], b"")

    def do_GET(self):
        size = self.server.owner.size
        self.send_response(200)
        for name, value in [("content-length", str(size)), *self.server.owner.metadata]:
            self.send_header(name, value)
        self.end_headers()
        piece = b"\0" * PIECE
        for _ in range(size // PIECE):
            self.wfile.write(piece)


class SinkUpstream(TestServer):
    """A TLS server on 127.0.0.1 that streams bodies of `size` bytes (a multiple of PIECE) without holding them."""

    handler = SinkHandler
    thread_name = "sink-upstream"

    def __init__(self, ca: trustme.CA, size: int):
        super().__init__(ca)
        self.size = size
        self.metadata: list[tuple[str, str]] = []


class NoDelayS3Handler(S3Upstream.handler):
    # It writes a response's header and body separately: with Nagle's algorithm the body would wait 40 ms for
    # the peer's delayed ACK, and that, not the proxy, would set the pace of small GETs.
    disable_nagle_algorithm = True


class NoDelayS3Upstream(S3Upstream):
    handler = NoDelayS3Handler


class Upload:
    """A body of known length that is never held in memory (sent with Content-Length)."""

    def __init__(self, size: int):
        self.remaining = size
        self.piece = b"\x5a" * PIECE

    def __len__(self) -> int:
        return self.remaining

    def read(self, amount: int = -1) -> bytes:
        piece = self.piece[: min(self.remaining, PIECE if amount < 0 else amount)]
        self.remaining -= len(piece)
        return piece


def signed_headers(method: str, url: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    """SigV4 headers (with `headers`, signed too) for a request whose body is not signed (UNSIGNED-PAYLOAD), as
    SDKs send over https."""
    request = AWSRequest(method=method, url=url, headers=headers)
    request.context["client_config"] = UNSIGNED_PAYLOAD
    S3SigV4Auth(Credentials(ACCESS_KEY, SECRET), "s3", "us-east-1").add_auth(request)
    return dict(request.headers)


def write_key_and_credentials(work: Path) -> None:
    """The key `bench` and the benchmark's credentials, as mode-600 files that policy() names."""
    (work / "bench.key").write_text(base64.b64encode(os.urandom(32)).decode())
    (work / "app.yaml").write_text(f"access_key_id: {ACCESS_KEY}\nsecret_access_key: {SECRET}\n")
    for name in ("bench.key", "app.yaml"):
        (work / name).chmod(0o600)


def policy(work: Path, ports: Iterable[int], rules: Iterable[str]) -> str:
    """A policy for S3 endpoints on 127.0.0.1 `ports`, with the files of write_key_and_credentials(work)
    and `rules` (YAML flow mappings, first match wins)."""
    endpoints = ", ".join(f'{{host: "127.0.0.1:{port}", provider: s3}}' for port in ports)
    return f"""version: 1
endpoints: [{endpoints}]
keys: {{bench: {{file: {work}/bench.key}}}}
credentials: {{app: {{file: {work}/app.yaml}}}}
rules:
""" + "".join(f"  - {rule}\n" for rule in rules)


def cpu_seconds(pid: int) -> float:
    """User and system CPU of the process tree, including its children that have ended and been waited for."""
    ticks = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rpartition(")")[2].split()
            ticks += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> list[int]:
    """Every thread of the process tree of `pid`."""
    return [int(task.name) for member in process_tree(pid) for task in Path(f"/proc/{member}/task").glob("*")]


def preemptions(pid: int) -> int:
    """Involuntary context switches of every thread of the process tree: how often the kernel took a core away
    from it while it had work (on a small machine, for the client, the upstream or another proxy process)."""
    total = 0
    for thread in threads(pid):
        with contextlib.suppress(OSError):  # a thread that ended while we looked
            for line in Path(f"/proc/{thread}/status").read_text().splitlines():
                if line.startswith("nonvoluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) summed over the process tree."""
    totals = {"VmRSS": 0, "VmHWM": 0}
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            lines = Path(f"/proc/{member}/status").read_text().splitlines()
            fields = dict(line.split(":", 1) for line in lines if ":" in line)
            for name in totals:
                totals[name] += int(fields[name].split()[0])
    return totals


def reset_peak_memory(pid: int) -> None:
    """Start VmHWM afresh at the current RSS, so the next reading is the peak of what follows."""
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            Path(f"/proc/{member}/clear_refs").write_text("5")
