"""`keycourier rotate` end to end against the strict S3 and Azure upstreams, keys in the Vault-API test server:
every object moved onto the newest key version, checked at the upstream (it opens with the new key and not
with the old), while an application keeps reading through keycourier; killed halfway and resumed; plaintext
objects migrated; a multipart copy for large objects."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import boto3
import pytest
from azure.storage.blob import BlobServiceClient, ContentSettings
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.conftest import REPO, Keycourier
from tests.digests import md5_b64, sha256_b64
from tests.test_e2e_rotation import (ACCESS_KEY, ACCOUNT, ACCOUNT_KEY, SECRET, V1, V2, azure,  # noqa: F401
                                     rotation_policy, vault, write_secret_files)
from tests.upstreams.s3 import S3Upstream

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def s3(ca):
    with S3Upstream(ca, {ACCESS_KEY: SECRET}) as upstream:
        for bucket in ("rot-many", "rot-plain", "rot-dry"):
            upstream.create_bucket(bucket)
        yield upstream


@pytest.fixture(scope="module")
def workdir(vault, s3, azure, ca_pem, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rotate")
    write_secret_files(workdir, vault)
    (workdir / "policies.yaml").write_text(rotation_policy(vault, s3, azure, ca_pem, f"""\
  - {{match: {{provider: s3, bucket: "rot-*"}}, action: encrypt, key: rot, plaintext_reads: allow}}
  - {{match: {{provider: azure, account: {ACCOUNT}, bucket: rot}}, action: encrypt, key: rot}}
"""))
    return workdir


@pytest.fixture(scope="module")
def proxy(workdir, vault, keycourier_confdir, ca_pem):
    """keycourier for the application, on the same policy (in a folder of its own: it writes its log there)."""
    own = workdir / "proxy"
    own.mkdir()
    write_secret_files(own, vault)
    running = Keycourier(own, keycourier_confdir, (workdir / "policies.yaml").read_text(), upstream_ca=ca_pem)
    yield running
    running.stop()


def s3_client(endpoint: str, proxy: Keycourier | None = None, ca_pem=None):
    """Through keycourier (the application) or straight to the upstream (the test's own check)."""
    proxies = {"https": proxy.url} if proxy else {}
    return boto3.session.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET).client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", verify=str(proxy.ca_cert if proxy else ca_pem),
        config=Config(retries={"total_max_attempts": 1}, proxies=proxies, s3={"addressing_style": "path"}))


def rotate_command(workdir, ca_pem, endpoint, *args):
    credential = ("--credential", "s3") if "--account" not in args else ()
    return [sys.executable, "-m", "keycourier.cli", "rotate", "--policies", str(workdir / "policies.yaml"),
            "--endpoint", endpoint, "--upstream-ca", str(ca_pem), *credential, *args]


def opens_with(s3, bucket: str, name: str, key: bytes, ca_pem) -> bool:
    try:
        s3_client(s3.endpoint_url, ca_pem=ca_pem).head_object(Bucket=bucket, Key=name, SSECustomerAlgorithm="AES256",
                                                              SSECustomerKey=key)
        return True
    except ClientError:
        return False


def copies_of(s3, bucket: str, name: str, since: int = 0) -> int:
    """CopyObject requests and multipart uploads started for one object (since the `since`th request)."""
    def query(r):
        return {k for k, _ in r.query}
    return sum(1 for r in list(s3.requests)[since:] if r.path == f"/{bucket}/{name}" and (
        (r.method == "PUT" and r.header("x-amz-copy-source") and "uploadId" not in query(r))
        or (r.method == "POST" and "uploads" in query(r))))


def test_rotate_moves_every_object_while_reads_go_on_and_resumes_where_it_was_killed(
        proxy, s3, vault, workdir, ca_pem, tmp_path):
    app = s3_client(s3.endpoint_url, proxy)
    contents = {f"obj-{n:03d}": os.urandom(2000 + n) for n in range(30)}
    for name, data in contents.items():
        app.put_object(Bucket="rot-many", Key=name, Body=data, ContentType="text/x-kept", Metadata={"owner": name})
    contents["large.bin"] = os.urandom(11 * MiB)
    app.upload_fileobj(io.BytesIO(contents["large.bin"]), "rot-many", "large.bin")
    vault.kv_put("kc/rot", {"key": base64.b64encode(V2).decode()})
    time.sleep(1.2)

    failures, stop = [], threading.Event()

    def read_loop():
        reader = s3_client(s3.endpoint_url, proxy)
        while not stop.is_set():
            for name in list(contents)[::7]:
                try:
                    if reader.get_object(Bucket="rot-many", Key=name)["Body"].read() != contents[name]:
                        failures.append(f"{name}: wrong bytes")
                except ClientError as exc:
                    failures.append(f"{name}: {exc}")
            time.sleep(0.05)

    reader = threading.Thread(target=read_loop)
    reader.start()
    state, report = tmp_path / "state.jsonl", tmp_path / "report.json"
    command = rotate_command(workdir, ca_pem, s3.endpoint_url, "--bucket", "rot-many", "--state", str(state),
                             "--concurrency", "1", "--multipart-threshold", str(8 * MiB), "--report", str(report))
    try:
        first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        while not state.exists() or len(state.read_text().splitlines()) < 15:
            time.sleep(0.05)
            assert first.poll() is None, first.stderr.read().decode()
        first.send_signal(signal.SIGKILL)  # killed halfway
        first.wait()
        done_before = {json.loads(line) for line in state.read_text().splitlines()}
        assert 15 <= len(done_before) < len(contents)
        resumed_at = len(s3.requests)
        second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        stop.set()
        reader.join()
    assert second.returncode == 0, second.stderr
    summary = json.loads(report.read_text())
    assert summary["failed"] == 0 and summary["skipped_from_state"] == len(done_before)
    assert summary["rotated"] + summary["already_current"] == len(contents) - len(done_before)
    assert failures == []  # the application never saw a failed read
    for name, data in contents.items():
        assert opens_with(s3, "rot-many", name, V2, ca_pem) and not opens_with(s3, "rot-many", name, V1, ca_pem)
        # The second run copies none of what the first finished (nor what it copied just before it was killed:
        # that is found already current), and nothing twice.
        assert copies_of(s3, "rot-many", name, since=resumed_at) <= (0 if name in done_before else 1)
        assert s3_client(s3.endpoint_url, ca_pem=ca_pem).get_object(
            Bucket="rot-many", Key=name, SSECustomerAlgorithm="AES256", SSECustomerKey=V2)["Body"].read() == data
    kept = s3_client(s3.endpoint_url, ca_pem=ca_pem).head_object(Bucket="rot-many", Key="obj-001",
                                                                 SSECustomerAlgorithm="AES256", SSECustomerKey=V2)
    assert kept["ContentType"] == "text/x-kept" and kept["Metadata"] == {"owner": "obj-001"}
    assert s3.stored("rot-many", "large.bin").parts_count == 2  # copied in parts (threshold 8 MiB)
    # A run on a bucket already on the newest version changes nothing.
    again = subprocess.run(rotate_command(workdir, ca_pem, s3.endpoint_url, "--bucket", "rot-many"), cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and f"already current: {len(contents)}" in again.stdout


def test_plaintext_objects_are_left_unless_asked_then_migrated(proxy, s3, vault, workdir, ca_pem):
    direct = s3_client(s3.endpoint_url, ca_pem=ca_pem)
    for n in range(3):
        direct.put_object(Bucket="rot-plain", Key=f"legacy-{n}", Body=b"before encryption %d" % n)
    left = subprocess.run(rotate_command(workdir, ca_pem, s3.endpoint_url, "--bucket", "rot-plain"), cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert left.returncode == 0 and "plaintext left: 3" in left.stdout
    assert s3.stored("rot-plain", "legacy-0").sse_customer_key_md5 is None
    migrated = subprocess.run(rotate_command(workdir, ca_pem, s3.endpoint_url, "--bucket", "rot-plain",
                                             "--include-plaintext"), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert migrated.returncode == 0 and "migrated from plaintext: 3" in migrated.stdout
    newest = base64.b64decode(vault.kv_read("kc/rot")["key"])
    for n in range(3):
        assert s3.stored("rot-plain", f"legacy-{n}").sse_customer_key_md5 == md5_b64(newest)
    assert s3_client(s3.endpoint_url, proxy).get_object(Bucket="rot-plain", Key="legacy-1")["Body"].read() == b"before encryption 1"


def test_a_dry_run_lists_what_would_change_and_changes_nothing(proxy, s3, workdir, ca_pem):
    s3_client(s3.endpoint_url, ca_pem=ca_pem).put_object(Bucket="rot-dry", Key="old-key.txt", Body=b"x",
                                                         SSECustomerAlgorithm="AES256", SSECustomerKey=V1)
    before = len(s3.requests)
    dry = subprocess.run(rotate_command(workdir, ca_pem, s3.endpoint_url, "--bucket", "rot-dry", "--dry-run"),
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and "would rotate: old-key.txt" in dry.stdout
    assert s3.stored("rot-dry", "old-key.txt").sse_customer_key_md5 == md5_b64(V1)
    assert not [r for r in s3.requests[before:] if r.method == "PUT"]
    assert base64.b64encode(V1).decode() not in dry.stdout + dry.stderr  # no key in the output


def test_azure_blobs_are_rotated_by_put_blob_from_url_keeping_metadata_and_properties(proxy, azure, vault, workdir, ca_pem,
                                                                                      monkeypatch):
    proxy.configure_application(monkeypatch)
    client = BlobServiceClient(account_url=azure.blob_url(ACCOUNT), retry_total=0,
                               credential={"account_name": ACCOUNT, "account_key": ACCOUNT_KEY})
    for n in range(3):
        client.get_blob_client("rot", f"blob-{n}").upload_blob(
            b"azure %d" % n, overwrite=True, metadata={"n": str(n)}, content_settings=ContentSettings(content_type="text/x-az"))
    under = azure.stored(ACCOUNT, "rot", "blob-0").encryption_key_sha256
    newest = os.urandom(32)
    vault.kv_put("kc/rot", {"key": base64.b64encode(newest).decode()})
    result = subprocess.run(rotate_command(workdir, ca_pem, azure.blob_url(ACCOUNT), "--bucket", "rot",
                                           "--account", ACCOUNT), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rotated: 3" in result.stdout
    for n in range(3):
        stored = azure.stored(ACCOUNT, "rot", f"blob-{n}")
        assert stored.encryption_key_sha256 == sha256_b64(newest) != under
        assert stored.metadata == {"n": str(n)} and ("Content-Type", "text/x-az") in stored.content_headers
    assert client.get_blob_client("rot", "blob-2").download_blob().readall() == b"azure 2"
