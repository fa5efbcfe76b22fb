import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def keycourier(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "keycourier.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_check_prints_one_line_per_rule():
    result = keycourier("check", "policies.yaml")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3 and "encrypt with key dev" in result.stdout


def test_check_reports_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nendpoints: []\nrules:\n  - {match: {provider: s3}, action: encrypt, key: nope}\n")
    result = keycourier("check", str(bad))
    assert result.returncode == 1
    assert result.stderr.strip() == f"{bad}:4: unknown key name 'nope' (keys: none defined)"


def test_run_refuses_an_invalid_policy_before_listening(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nendpoints: []\nrules: []\nextra: 1\n")
    result = keycourier("run", "--policies", str(bad), "--confdir", str(tmp_path / "conf"))
    assert result.returncode == 1 and f"{bad}:4: unknown field 'extra'" in result.stderr


def test_ca_creates_the_ca_once_and_prints_its_certificate(tmp_path):
    first = keycourier("ca", "--confdir", str(tmp_path))
    cert = Path(first.stdout.strip())
    assert first.returncode == 0 and cert.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert keycourier("ca", "--confdir", str(tmp_path)).stdout == first.stdout
    assert cert.read_text() == Path(keycourier("ca", "--confdir", str(tmp_path)).stdout.strip()).read_text()


def test_keygen_refuses_to_overwrite(tmp_path):
    assert keycourier("keygen", str(tmp_path / "k.key")).returncode == 0
    again = keycourier("keygen", str(tmp_path / "k.key"))
    assert again.returncode == 1 and "not overwriting" in again.stderr


def test_version_is_the_installed_distributions():
    from importlib.metadata import version

    result = keycourier("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"keycourier {version('keycourier')}"


def test_check_reports_every_error_with_its_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("""version: 1
endpoints:
  - {host: "s3.example.net", provider: s4}
keys:
  k1: {file: a.key, vault: {path: secret/data/x}}
rules:
  - {match: {provider: s3}, action: encrypt, key: nope}
  - {match: {provider: s3}, action: drop}
  - {match: {provider: s3}, action: encrypt, key: k1}
  - {name: Bad Name, match: {provider: s3}, action: deny}
""")
    result = keycourier("check", str(bad))
    assert result.returncode == 1 and result.stdout == ""
    assert [line.split(": ", 1)[0] for line in result.stderr.splitlines()] == [f"{bad}:{n}" for n in (3, 5, 7, 8, 10)]
    assert "unknown provider 's4'" in result.stderr and "exactly one source" in result.stderr
    assert "unknown key name 'nope'" in result.stderr and "unknown action 'drop'" in result.stderr
    assert "'k1'" not in result.stderr.splitlines()[-1]  # a rule naming a broken key is not reported twice


def test_check_warns_of_what_fails_at_run_time_and_exits_0(tmp_path):
    (tmp_path / "open.key").write_text("x")
    (tmp_path / "open.key").chmod(0o644)
    policy = tmp_path / "p.yaml"
    policy.write_text("""version: 1
vault: {addr: "http://vault:8200"}
endpoints:
  - {host: "s3.example.net", provider: s3}
keys:
  missing: {file: missing.key}
  open: {file: open.key}
  vaulted: {vault: {path: secret/data/k}}
rules:
  - {match: {provider: s3, bucket: "pay-*"}, action: encrypt, key: open}
  - {match: {provider: s3, bucket: "pay-roll"}, action: deny}
  - {match: {provider: azure}, action: deny}
  - {match: {provider: "*"}, action: deny}
""")
    result = keycourier("check", str(policy))
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 4
    warnings = result.stderr.splitlines()
    assert all(": warning: " in line for line in warnings) and len(warnings) == 5, result.stderr
    assert "not https" in result.stderr and "missing.key: No such file" in result.stderr
    assert "readable by group/others (mode 644)" in result.stderr
    assert f"{policy}:11: warning: rule11 can never match: rule10 (line 10)" in result.stderr
    assert f"{policy}:12: warning: rule12 is for azure, but no endpoint has provider azure" in result.stderr


def test_check_warns_of_a_vault_secret_with_no_vault_address(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nendpoints: []\ncredentials:\n  app: {vault: {path: secret/data/app}}\nrules: []\n")
    result = subprocess.run([sys.executable, "-m", "keycourier.cli", "check", str(policy)], capture_output=True,
                            text=True, env={k: v for k, v in os.environ.items() if k != "VAULT_ADDR"})
    assert result.returncode == 0
    assert result.stderr.strip() == f"{policy}:4: warning: 'app' is read from Vault, but there is no vault.addr and VAULT_ADDR is not set"


def test_run_errors_are_one_line(tmp_path):
    common = ("run", "--policies", "policies.yaml", "--confdir", str(tmp_path / "conf"))
    missing_ca = keycourier(*common, "--upstream-ca", str(tmp_path / "nope.pem"))
    assert missing_ca.returncode == 1
    assert missing_ca.stderr == f"keycourier: --upstream-ca {tmp_path / 'nope.pem'}: No such file or directory\n"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for flag, what in (("--listen-port", "listen on"), ("--metrics-port", "serve metrics on")):
            result = keycourier(*common, flag, str(port))
            assert result.returncode == 1
            assert result.stderr == f"keycourier: cannot {what} 127.0.0.1:{port}: the port is in use\n"


def test_an_unreadable_ca_is_one_line(tmp_path):
    confdir = tmp_path / "conf"
    confdir.mkdir()
    (confdir / "mitmproxy-ca.pem").write_text("not a CA")
    result = keycourier("ca", "--confdir", str(confdir))
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"keycourier: cannot use the CA in {confdir}: ValueError")
