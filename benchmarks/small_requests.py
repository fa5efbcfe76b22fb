"""Measures keycourier side by side with plain mitmdump and with no proxy at all, in one run.

    .venv/bin/python benchmarks/small_requests.py [--runs 3] [--seconds 5] [--clients 8] [--paced-rate 300]
                                                  [--large-mib 256] [--workers N] [--pin]
                                                  [--keycourier-repo PATH] [--json FILE]

Configurations: direct (client to upstream), mitmdump (this .venv's, streaming bodies as keycourier does:
mitmdump_streaming.py), keycourier with a passthrough rule and keycourier with an encrypt rule (file key and
file credentials: no Vault, so the numbers are the proxy's).
Small requests: signed GetObject of 1 KiB and PutObject of 4 KiB from concurrent clients, each a thread with
one kept-alive connection (CONNECT through the proxy, as HTTPS_PROXY clients do; http.client and botocore's
signer, lighter than requests or boto3, so that the proxy sets the pace), to the strict S3 test
upstream (tests/upstreams/s3.py, which verifies every SigV4 signature): requests/s, latency, and the proxy's
CPU per request (its whole process tree, from /proc). Flat out, client, upstream and proxy processes share the
cores and preempt one another (preempted/req: the proxy's involuntary context switches per request), which
inflates CPU per request the more proxy processes there are; the paced GetObject measurement (--paced-rate
requests/s in all) compares CPU per request at a load every configuration keeps up with, and --pin keeps the
clients and upstreams on one core and the proxies on the others.
Large bodies: one streamed PUT and GET to a sink upstream: MiB/s, proxy CPU per GiB, proxy peak RSS.
Everything runs on 127.0.0.1 over TLS. Every run measures each configuration in turn, in an order that
rotates from run to run, so the machine's other load hits all alike; medians over runs are printed with
their min-max, and ratios to mitmdump are medians of the per-run ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, closing
from dataclasses import dataclass
from http.client import HTTPSConnection
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit

import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (ACCESS_KEY, PIECE, SECRET, NoDelayS3Upstream, SinkUpstream, Upload,  # noqa: E402
                               cpu_seconds, memory_kib, policy, preemptions, reset_peak_memory, signed_headers,
                               threads,
                               write_key_and_credentials)
from tests.conftest import REPO, Keycourier, ProxyProcess, free_port  # noqa: E402
from tests.upstreams.s3 import S3Upstream  # noqa: E402

SMALL_GET_SIZE, SMALL_PUT_SIZE = 1024, 4 * 1024
TIMEOUT = 60  # seconds a socket may wait: a stuck proxy fails the run instead of hanging it
MITMDUMP_SCRIPT = Path(__file__).with_name("mitmdump_streaming.py")


@dataclass
class Configuration:
    """One way to reach the upstreams: through `proxy`, or straight to them (None)."""

    name: str
    proxy: ProxyProcess | None
    tls: ssl.SSLContext

    def connect(self, url: str) -> HTTPSConnection:
        target = urlsplit(url)
        if self.proxy is None:
            return HTTPSConnection(target.hostname, target.port, context=self.tls, timeout=TIMEOUT, blocksize=PIECE)
        connection = HTTPSConnection("127.0.0.1", self.proxy.port, context=self.tls, timeout=TIMEOUT,
                                     blocksize=PIECE)
        connection.set_tunnel(target.hostname, target.port)
        return connection

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.proxy.process.pid) if self.proxy else None

    def preemptions(self) -> int | None:
        return preemptions(self.proxy.process.pid) if self.proxy else None

    def reset_peak_memory(self) -> None:
        if self.proxy:
            reset_peak_memory(self.proxy.process.pid)

    def peak_memory_mib(self) -> float | None:
        return memory_kib(self.proxy.process.pid)["VmHWM"] / 1024 if self.proxy else None


def exchange(connection: HTTPSConnection, method: str, url: str, body: bytes | Upload | None = None,
             expect: int = 0) -> None:
    """One request, signed afresh as a client does; the answer must be 200 with `expect` body bytes."""
    headers = signed_headers(method, url)
    if body is not None:
        headers["Content-Length"] = str(len(body))
    connection.request(method, urlsplit(url).path, body=body, headers=headers)
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{method} {url}: {response.status} {response.read(2000).decode(errors='replace')}")
    received = 0
    while piece := response.read(PIECE):
        received += len(piece)
    if received != expect:
        raise RuntimeError(f"{method} {url}: {received} body bytes, not {expect}")


@dataclass(frozen=True)
class Column:
    title: str
    metric: str
    form: str  # of one value
    spread: bool = False  # also show min-max over runs
    versus_mitmdump: bool = False  # also show the median of the per-run ratios to mitmdump


SMALL_REQUEST_COLUMNS = (
    Column("req/s", "requests_per_second", "{:.0f}", spread=True, versus_mitmdump=True),
    Column("p50 ms", "p50_ms", "{:.1f}"),
    Column("p99 ms", "p99_ms", "{:.1f}"),
    Column("CPU ms/req", "cpu_ms_per_request", "{:.2f}", spread=True, versus_mitmdump=True),
    Column("preempted/req", "preemptions_per_request", "{:.2f}"),
)
LARGE_BODY_COLUMNS = (
    Column("MiB/s", "mib_per_second", "{:.0f}", spread=True, versus_mitmdump=True),
    Column("CPU s/GiB", "cpu_seconds_per_gib", "{:.2f}", spread=True, versus_mitmdump=True),
    Column("peak RSS MiB", "peak_rss_mib", "{:.0f}", spread=True),
)


class Bench:
    """The measurements, against the two upstreams."""

    def __init__(self, s3: S3Upstream, sink: SinkUpstream, *, clients: int, seconds: float, paced_rate: float):
        self.s3 = s3
        self.sink = sink
        self.clients = clients
        self.seconds = seconds
        self.paced_rate = paced_rate
        self.small_body = os.urandom(SMALL_PUT_SIZE)

    def measurements(self) -> list[tuple[str, str, tuple[Column, ...], Callable[[Configuration], dict]]]:
        """(key, title, columns, measure) of each measurement, in the order they run."""
        large = f"{self.sink.size // PIECE} MiB"
        return [
            ("get_1k", f"GetObject 1 KiB, {self.clients} clients", SMALL_REQUEST_COLUMNS, self.get_small),
            ("put_4k", f"PutObject 4 KiB, {self.clients} clients", SMALL_REQUEST_COLUMNS, self.put_small),
            ("get_1k_paced", f"GetObject 1 KiB at {self.paced_rate:g} requests/s, {self.clients} clients",
             SMALL_REQUEST_COLUMNS, self.get_small_paced),
            ("put_large", f"PUT {large}, streamed", LARGE_BODY_COLUMNS, self.put_large),
            ("get_large", f"GET {large}, streamed", LARGE_BODY_COLUMNS, self.get_large),
        ]

    def small_url(self, configuration: Configuration, name: str) -> str:
        # Its own objects for each configuration: only encrypt's are stored under the customer key.
        return f"{self.s3.base_url}/bench/{configuration.name}/{name}"

    def seed(self, configuration: Configuration) -> None:
        """Store the object get_small reads, through the configuration itself."""
        url = self.small_url(configuration, "get-1k.bin")
        with closing(configuration.connect(url)) as connection:
            exchange(connection, "PUT", url, os.urandom(SMALL_GET_SIZE))

    def get_small(self, configuration: Configuration, rate: float | None = None) -> dict:
        url = self.small_url(configuration, "get-1k.bin")
        return self.measure_requests(configuration, url, lambda connection: exchange(
            connection, "GET", url, expect=SMALL_GET_SIZE), rate)

    def get_small_paced(self, configuration: Configuration) -> dict:
        """At a load every configuration keeps up with: CPU per request without the cores being oversubscribed
        (flat out, client, upstream and proxy processes preempt one another on a small machine)."""
        return self.get_small(configuration, self.paced_rate)

    def put_small(self, configuration: Configuration) -> dict:
        url = self.small_url(configuration, "put-4k.bin")
        return self.measure_requests(configuration, url, lambda connection: exchange(
            connection, "PUT", url, self.small_body))

    def measure_requests(self, configuration: Configuration, url: str,
                         send: Callable[[HTTPSConnection], None], rate: float | None = None) -> dict:
        """`clients` threads, each on its own kept-alive connection, `send` for `seconds`: as fast as they can,
        or `rate` requests/s in all, evenly spaced."""
        interval = self.clients / rate if rate else 0.0  # of each client
        stop = threading.Event()
        ready = threading.Barrier(self.clients + 1, timeout=TIMEOUT)
        latencies: list[list[float]] = [[] for _ in range(self.clients)]
        failures: list[Exception] = []

        def client(own_latencies: list[float]) -> None:
            try:
                with closing(configuration.connect(url)) as connection:
                    send(connection)  # the handshakes and the first request are not measured
                    ready.wait()
                    due = time.perf_counter()
                    while not stop.is_set():
                        if interval:
                            due += interval
                            if stop.wait(max(0.0, due - time.perf_counter())):
                                break
                        sent = time.perf_counter()
                        send(connection)
                        own_latencies.append(time.perf_counter() - sent)
            except Exception as error:
                failures.append(error)
                ready.abort()

        threads = [threading.Thread(target=client, args=(own,), daemon=True) for own in latencies]
        for thread in threads:
            thread.start()
        try:
            ready.wait()
            cpu_before, started = configuration.cpu_seconds(), time.monotonic()
            preempted_before = configuration.preemptions()
            stop.wait(self.seconds)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            self.s3.clear_requests()  # the upstream records every request
            if failures:
                raise failures[0]
        elapsed = time.monotonic() - started
        cpu_after, preempted_after = configuration.cpu_seconds(), configuration.preemptions()
        every = [latency * 1000 for own in latencies for latency in own]
        percentiles = statistics.quantiles(every, n=100)
        return {"requests": len(every),
                "requests_per_second": len(every) / elapsed,
                "p50_ms": percentiles[49],
                "p99_ms": percentiles[98],
                "cpu_ms_per_request": None if cpu_before is None else (cpu_after - cpu_before) * 1000 / len(every),
                "preemptions_per_request": None if cpu_before is None else (preempted_after - preempted_before) / len(every)}

    def put_large(self, configuration: Configuration) -> dict:
        return self.measure_large(configuration, lambda connection, url: exchange(
            connection, "PUT", url, Upload(self.sink.size)))

    def get_large(self, configuration: Configuration) -> dict:
        return self.measure_large(configuration, lambda connection, url: exchange(
            connection, "GET", url, expect=self.sink.size))

    def measure_large(self, configuration: Configuration, send: Callable[[HTTPSConnection, str], None]) -> dict:
        url = f"{self.sink.base_url}/bench/large.bin"
        with closing(configuration.connect(url)) as connection:
            connection.connect()  # the handshakes are not measured
            configuration.reset_peak_memory()
            cpu_before, started = configuration.cpu_seconds(), time.monotonic()
            send(connection, url)
            elapsed = time.monotonic() - started
            cpu_after = configuration.cpu_seconds()
        gib = self.sink.size / 2**30
        return {"mib_per_second": gib * 1024 / elapsed,
                "cpu_seconds_per_gib": None if cpu_before is None else (cpu_after - cpu_before) / gib,
                "peak_rss_mib": configuration.peak_memory_mib()}


def start_configurations(cleanup: ExitStack, work: Path, ca: trustme.CA, s3: S3Upstream, sink: SinkUpstream,
                         keycourier_repo: Path, workers: int) -> list[Configuration]:
    upstream_ca = work / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(upstream_ca))
    write_key_and_credentials(work)
    confdir = work / "confdir"  # one interception CA for all proxies
    python = str(keycourier_repo / ".venv" / "bin" / "python")
    keycouriers = {}
    runs = [("passthrough", "passthrough", 1), ("encrypt", "encrypt, key: bench", 1)]
    if workers > 1:
        runs.append((f"encrypt-x{workers}", "encrypt, key: bench", workers))
    for name, action, count in runs:
        (work / name).mkdir()
        rules = [f"{{match: {{provider: s3, bucket: bench}}, action: {action}}}"]
        keycouriers[name] = Keycourier(work / name, confdir, policy(work, [s3.port, sink.port], rules),
                                       upstream_ca=upstream_ca, save_flows=False, python=python, cwd=keycourier_repo,
                                       args=("--workers", str(count)) if count > 1 else ())
        cleanup.callback(keycouriers[name].stop)
    port = free_port()
    mitmdump = ProxyProcess("mitmdump", [
        str(Path(sys.executable).with_name("mitmdump")), "--listen-host", "127.0.0.1", "--listen-port", str(port),
        "--set", f"confdir={confdir}", "--set", f"ssl_verify_upstream_trusted_ca={upstream_ca}",
        "--scripts", str(MITMDUMP_SCRIPT)], port=port, log_path=work / "mitmdump.log")
    cleanup.callback(mitmdump.stop)

    tls = ssl.create_default_context(cafile=upstream_ca)
    tls.load_verify_locations(keycouriers["encrypt"].ca_cert)
    return [Configuration("direct", None, tls), Configuration("mitmdump", mitmdump, tls),
            *(Configuration(name, proxy, tls) for name, proxy in keycouriers.items())]


def pin(configurations: list[Configuration]) -> None:
    """--pin: this process's threads (the clients and the upstreams) on the first core, every proxy's on the others,
    so that no proxy competes with them for a core; a worker pool's every worker must be running first."""
    cores = sorted(os.sched_getaffinity(0))
    for configuration in configurations:
        if isinstance(configuration.proxy, Keycourier):
            configuration.proxy.wait_ready(TIMEOUT)
        if configuration.proxy:
            for thread in threads(configuration.proxy.process.pid):
                os.sched_setaffinity(thread, cores[1:])
    for thread in threads(os.getpid()):
        os.sched_setaffinity(thread, cores[:1])


def summarize(samples: dict[str, list[dict]], columns: tuple[Column, ...]) -> dict[str, dict[str, dict]]:
    """For each configuration and metric: median, min and max over runs, and the median per-run ratio to mitmdump."""
    summary = {}
    for name, runs in samples.items():
        summary[name] = {}
        for column in columns:
            values = [run[column.metric] for run in runs]
            if values[0] is None:
                continue  # no proxy: nothing to read from /proc
            entry = {"median": statistics.median(values), "min": min(values), "max": max(values)}
            if column.versus_mitmdump:
                baseline = [run[column.metric] for run in samples["mitmdump"]]
                entry["vs_mitmdump"] = statistics.median(value / base for value, base in zip(values, baseline))
            summary[name][column.metric] = entry
    return summary


def print_table(title: str, summary: dict[str, dict[str, dict]], columns: tuple[Column, ...]) -> None:
    header = ["config"]
    for column in columns:
        header += [column.title] + (["x mitmdump"] if column.versus_mitmdump else [])
    rows = [header]
    for name, metrics in summary.items():
        row = [name]
        for column in columns:
            entry = metrics.get(column.metric)
            if entry is None:
                row += ["-"] * (1 + column.versus_mitmdump)
                continue
            text = column.form.format(entry["median"])
            if column.spread:
                text += f" ({column.form.format(entry['min'])}-{column.form.format(entry['max'])})"
            row.append(text)
            if column.versus_mitmdump:
                row.append(f"{entry['vs_mitmdump']:.2f}")
        rows.append(row)
    widths = [max(len(row[index]) for row in rows) for index in range(len(header))]
    print(f"\n{title}")
    for row in rows:
        print("  ".join(cell.ljust(width) if index == 0 else cell.rjust(width)
                        for index, (cell, width) in enumerate(zip(row, widths))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="per small-request measurement")
    parser.add_argument("--clients", type=int, default=8, help="concurrent small-request clients")
    parser.add_argument("--paced-rate", type=float, default=300.0,
                        help="requests/s of the paced measurement (below what every configuration serves)")
    parser.add_argument("--large-mib", type=int, default=256, help="size of the large body")
    parser.add_argument("--keycourier-repo", type=Path, default=REPO,
                        help="checkout of keycourier to measure, run with its own .venv (default: this one)")
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    parser.add_argument("--pin", action="store_true",
                        help="clients and upstreams on the first core, the proxies on the others (2 cores or more)")
    parser.add_argument("--workers", type=int, default=1,
                        help="also measure keycourier encrypt run with this many workers (keycourier run --workers)")
    args = parser.parse_args()
    if min(args.runs, args.clients, args.large_mib) < 1 or min(args.seconds, args.paced_rate) <= 0:
        parser.error("--runs, --clients, --large-mib, --seconds and --paced-rate must be positive")
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pin needs at least 2 cores")
    keycourier_repo = args.keycourier_repo.resolve()
    if not (keycourier_repo / ".venv" / "bin" / "python").exists():
        parser.error(f"{keycourier_repo} has no .venv/bin/python (run its scripts/setup.sh)")
    commit = subprocess.run(["git", "-C", str(keycourier_repo), "log", "-1", "--format=%h"],
                            capture_output=True, text=True).stdout.strip()
    print(f"keycourier {keycourier_repo} ({commit or 'no git commit'}), mitmproxy {version('mitmproxy')}; "
          f"{args.runs} runs, {args.seconds:g} s per small-request measurement, {os.cpu_count()} cores"
          f"{' (pinned: clients and upstreams on the first, proxies on the others)' if args.pin else ''}", flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as on Ctrl-C
    with ExitStack() as cleanup:
        work = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="kc-bench-")))
        ca = trustme.CA()
        s3 = cleanup.enter_context(NoDelayS3Upstream(ca, {ACCESS_KEY: SECRET}))
        s3.create_bucket("bench")
        sink = cleanup.enter_context(SinkUpstream(ca, args.large_mib * PIECE))
        configurations = start_configurations(cleanup, work, ca, s3, sink, keycourier_repo, args.workers)
        if args.pin:
            pin(configurations)
        bench = Bench(s3, sink, clients=args.clients, seconds=args.seconds, paced_rate=args.paced_rate)
        for configuration in configurations:
            bench.seed(configuration)

        measurements = bench.measurements()
        samples = {key: {configuration.name: [] for configuration in configurations} for key, *_ in measurements}
        for run in range(args.runs):
            order = configurations[run % len(configurations):] + configurations[:run % len(configurations)]
            for key, title, columns, measure in measurements:
                for configuration in order:
                    result = measure(configuration)
                    samples[key][configuration.name].append(result)
                    print(f"run {run + 1}/{args.runs}  {title}  {configuration.name}: "
                          f"{columns[0].form.format(result[columns[0].metric])} {columns[0].title}",
                          file=sys.stderr, flush=True)

    summaries = {}
    for key, title, columns, _ in measurements:
        summaries[key] = summarize(samples[key], columns)
        print_table(f"{title} (median (min-max) of {args.runs} runs)", summaries[key], columns)
    if args.json:
        settings = {**vars(args), "keycourier_repo": str(keycourier_repo), "keycourier_commit": commit,
                    "json": str(args.json), "mitmproxy": version("mitmproxy"), "cores": os.cpu_count()}
        args.json.write_text(json.dumps({"settings": settings, "summary": summaries, "runs": samples}, indent=2))


if __name__ == "__main__":
    main()
