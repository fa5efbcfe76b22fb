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
