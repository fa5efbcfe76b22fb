"""Shared fixtures: a test CA, and the real keycourier process started from the CLI."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trustme

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_pem(ca, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def keycourier_confdir(tmp_path_factory) -> Path:
    """One interception CA for the whole run, made by `keycourier ca` as a user would."""
    confdir = tmp_path_factory.mktemp("confdir")
    subprocess.run([sys.executable, "-m", "keycourier.cli", "ca", "--confdir", str(confdir)], check=True, capture_output=True)
    return confdir


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (the kernel here has no /proc/PID/task/TID/children)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process that ended while we looked
            fields = stat.read_text().rpartition(")")[2].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree = [pid]
    for member in tree:
        tree += children.get(member, [])
    return tree


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ProxyProcess:
    """A proxy in its own process, logging to a file; ready once it accepts connections on `port`."""

    def __init__(self, name: str, command: list[str], *, port: int, log_path: Path, cwd: Path = REPO,
                 env: dict[str, str] | None = None):
        self.name = name
        self.port = port
        self.log_path = log_path
        clean_env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and not k.startswith("VAULT_")}
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**clean_env, **(env or {})})
        try:
            self._wait_until_listening()
        except BaseException:  # also Ctrl-C while it starts: no process is left behind
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_until_listening(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not listen within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()


class Keycourier(ProxyProcess):
    """`keycourier run` in its own process, logging to a file the tests can read. `python` and `cwd` may name
    another checkout's interpreter and folder (the benchmarks compare checkouts)."""

    def __init__(self, workdir: Path, confdir: Path, policy_text: str, *, upstream_ca: Path | None = None,
                 mode: str = "regular", env: dict[str, str] | None = None, save_flows: bool = True,
                 python: str = sys.executable, cwd: Path = REPO, args: tuple[str, ...] = ()):
        self.workdir = workdir
        self.policy_path = workdir / "policies.yaml"
        self.policy_path.write_text(policy_text)
        self.metrics_port = free_port()
        self.flows_path = workdir / "flows.mitm" if save_flows else None
        self.ca_cert = confdir / "mitmproxy-ca-cert.pem"
        port = free_port()
        command = [python, "-m", "keycourier.cli", "run", "--policies", str(self.policy_path),
                   "--listen-port", str(port), "--confdir", str(confdir), "--mode", mode,
                   "--metrics-port", str(self.metrics_port), *args]
        if save_flows:
            command += ["--save-flows", str(self.flows_path)]
        if upstream_ca:
            command += ["--upstream-ca", str(upstream_ca)]
        super().__init__("keycourier", command, port=port, log_path=workdir / "keycourier.log", cwd=cwd, env=env)

    def scrape(self, path: str = "/metrics") -> tuple[int, str]:
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with direct.open(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def wait_ready(self, timeout: float = 20) -> None:
        """Until /readyz answers 200 (with --workers: every worker is running)."""
        deadline = time.monotonic() + timeout
        while (answer := self.scrape("/readyz"))[0] != 200:
            if time.monotonic() > deadline:
                raise AssertionError(f"keycourier not ready: {answer[1]}")
            time.sleep(0.1)

    def wait_for_log(self, text: str, timeout: float = 10, occurrences: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(text) < occurrences:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in keycourier's log:\n{self.log()}")
            time.sleep(0.1)

    def client_env(self) -> dict[str, str]:
        """What a legacy application is given: the proxy and the CA bundle (as boto3 and requests-based
        SDKs read it), nothing else."""
        return {"HTTPS_PROXY": self.url, "https_proxy": self.url, "AWS_CA_BUNDLE": str(self.ca_cert),
                "REQUESTS_CA_BUNDLE": str(self.ca_cert)}

    def configure_application(self, monkeypatch, **extra: str) -> None:
        """Point this test process (the legacy application) at keycourier through its environment."""
        for name in ("NO_PROXY", "no_proxy", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in {**self.client_env(), **extra}.items():
            monkeypatch.setenv(name, value)
