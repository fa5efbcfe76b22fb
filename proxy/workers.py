"""`keycourier run --workers N`: N proxy processes sharing one listening port (SO_REUSEPORT, the kernel spreads
connections over them), supervised by this process, which serves the one /metrics (every worker's metrics
summed, prometheus-client's multiprocess mode), /healthz and /readyz. Each worker is a whole keycourier: its own
policy reload, key cache and Vault client (so Vault sees up to N times the reads of one), the one CA from the
shared confdir. SIGTERM is passed on to every worker, each drains, then this process exits."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("keycourier")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own: set before it is imported
READY_FILE = "ready-{pid}"  # a worker's readiness: empty when ready, else the reason
RESTART_BACKOFF_SECONDS = 1.0
POLL_SECONDS = 0.2


def worker_count(text: str) -> int:
    """--workers: a number, or `auto` for the cores this process may run on."""
    if text == "auto":
        return len(os.sched_getaffinity(0))
    count = int(text)
    if count < 1:
        raise ValueError("--workers must be at least 1")
    return count


def readiness_file(directory: str | None) -> Path | None:
    return Path(directory) / READY_FILE.format(pid=os.getpid()) if directory else None


class Supervisor:
    def __init__(self, argv: list[str], count: int, metrics_host: str, metrics_port: int):
        self.argv, self.count = argv, count
        self.metrics_host, self.metrics_port = metrics_host, metrics_port
        self.directory = tempfile.mkdtemp(prefix="keycourier-metrics-")
        self.workers: list[subprocess.Popen] = []
        self.stopping = threading.Event()

    def run(self) -> int:
        from keycourier import metrics

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stop)
        server = metrics.serve(self.metrics_host, self.metrics_port, self._readiness,
                               registry=metrics.multiprocess_registry(self.directory))
        log.info(f"{self.count} workers; metrics, /healthz and /readyz at http://{self.metrics_host}:{self.metrics_port}")
        try:
            self.workers = [self._start(n) for n in range(self.count)]
            while not self.stopping.is_set():
                for n, worker in enumerate(self.workers):
                    if worker.poll() is not None and not self.stopping.is_set():
                        log.error(f"worker {n} (pid {worker.pid}) exited with {worker.returncode}; starting it again")
                        self._forget(worker)
                        time.sleep(RESTART_BACKOFF_SECONDS)
                        self.workers[n] = self._start(n)
                self.stopping.wait(POLL_SECONDS)
            codes = [worker.wait() for worker in self.workers]
            return 0 if all(code == 0 for code in codes) else 1
        finally:
            server.shutdown()
            for worker in self.workers:
                self._forget(worker)

    def _start(self, n: int) -> subprocess.Popen:
        env = {**os.environ, MULTIPROC_ENV: self.directory}
        # In a session of their own: a terminal's Ctrl-C reaches them once, passed on by this process.
        return subprocess.Popen([sys.executable, "-m", "keycourier.cli", *self.argv, "--worker-of", str(os.getpid())],
                                env=env, start_new_session=True)

    def _forget(self, worker: subprocess.Popen) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid, self.directory)
        Path(self.directory, READY_FILE.format(pid=worker.pid)).unlink(missing_ok=True)

    def _stop(self, signum, frame) -> None:
        if self.stopping.is_set():
            for worker in self.workers:
                worker.kill()
            return
        self.stopping.set()
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)

    def _readiness(self) -> str | None:
        if self.stopping.is_set():
            return "stopping: draining requests in flight"
        for n, worker in enumerate(self.workers):
            if worker.poll() is not None:
                return f"worker {n} is not running"
            state = Path(self.directory, READY_FILE.format(pid=worker.pid))
            if not state.exists():
                return f"worker {n} is starting"
            reason = state.read_text()
            if reason:
                return f"worker {n}: {reason}"
        return None
