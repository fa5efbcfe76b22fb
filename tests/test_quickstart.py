"""The README's quickstart, run as written: the store, keycourier on the embedded default, the AWS CLI, and the
proof that the object is encrypted at the store. After `./scripts/setup.sh` (the README's first command), which
made the keys the default names."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import textwrap
import time

import pytest

from tests.conftest import REPO, stop_process

PORTS = (9000, 8080, 9464)  # the store, keycourier, its metrics: as the embedded default and the README name them


def quickstart() -> tuple[list[str], str]:
    section = re.search(r"^## Quickstart.*?(?=^## )", (REPO / "README.md").read_text(), re.M | re.S).group(0)
    blocks = re.findall(r"^( *)```(sh|text)\n(.*?)^\1```", section, re.M | re.S)
    commands = [textwrap.dedent(body) for _, kind, body in blocks if kind == "sh"]
    (expected,) = [textwrap.dedent(body) for _, kind, body in blocks if kind == "text"]
    return commands, expected


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on {port}: {process.args}")
            time.sleep(0.1)


def test_the_quickstart_encrypts_at_the_store(tmp_path):
    for port in PORTS:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port}, which the quickstart uses, is taken on this machine")
    assert (REPO / "keys" / "dev.key").exists() and (REPO / "keys" / "app-credentials.yaml").exists()
    # A fresh checkout's layout, whose generated files (demo-ca.pem, .keycourier/) land in tmp_path.
    for name in (".venv", "keys", "tests", "policies.yaml"):
        (tmp_path / name).symlink_to(REPO / name)
    (store_command, keycourier_command, client_commands), expected = quickstart()
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and not k.startswith(("AWS_", "VAULT_"))}
    started = []
    try:
        for command, port in ((store_command, 9000), (keycourier_command, 8080)):
            started.append(subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=tmp_path, env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            wait_for_port(port, started[-1])
        client = subprocess.run(["bash", "-c", client_commands], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    finally:
        for process in reversed(started):
            stop_process(process)
    assert client.stdout.strip() == expected.strip()
    keycourier_log = started[1].stdout.read()
    assert started[1].returncode == 0  # SIGTERM: drained and exited cleanly
    assert re.search(r"PUT s3 bucket=secure-demo op=PutObject rule=rule\d+ action=encrypt key=dev file "
                     r"fingerprint=\S+ -> forwarded status=200", keycourier_log), keycourier_log
    assert "warning" not in keycourier_log.lower()  # the default's key and credential are all there
