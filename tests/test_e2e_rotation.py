"""Key rotation end to end: objects written under one version of a key stay readable through keycourier after
the key is rotated in Vault, and plaintext objects in a bucket that became `encrypt` are read or refused as the
rule says. Real boto3 and azure-storage-blob clients, strict S3 and Azure upstreams, keys in the Vault-API test
server; every claim is checked at the upstream (which key an object is stored under, how many requests it saw)."""
from __future__ import annotations

import base64
import datetime as dt
import os
import time
from pathlib import Path

import boto3
import pytest
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobSasPermissions, BlobServiceClient, generate_blob_sas
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.conftest import Keycourier
from tests.digests import md5_b64
from tests.upstreams.azure import AzureBlobUpstream
from tests.upstreams.s3 import S3Upstream
from tests.upstreams.vault import VaultServer

ACCESS_KEY, SECRET = "AKIAROTATIONTEST0001", "rotation/secret/access/key/for/tests/0001"
ACCOUNT = "rotacct"
ACCOUNT_KEY = base64.b64encode(b"keycourier-e2e-rotation-account-key-00000000000000000").decode()
V1, V2, STRANGER = os.urandom(32), os.urandom(32), os.urandom(32)


def sse_c(key: bytes, prefix: str = "SSECustomer") -> dict:
    return {f"{prefix}Algorithm": "AES256", f"{prefix}Key": key}


@pytest.fixture(scope="module")
def s3(ca):
    with S3Upstream(ca, {ACCESS_KEY: SECRET}) as upstream:
        for bucket in ("rot-a", "adopt-a", "strict-a"):
            upstream.create_bucket(bucket)
        yield upstream


@pytest.fixture(scope="module")
def azure(ca):
    with AzureBlobUpstream(ca, {ACCOUNT: ACCOUNT_KEY}) as upstream:
        upstream.create_container(ACCOUNT, "rot")
        yield upstream


@pytest.fixture(scope="module")
def vault(ca):
    with VaultServer(ca) as server:
        server.kv_put("kc/rot", {"key": base64.b64encode(V1).decode()})
        yield server


def write_secret_files(directory: Path, vault: VaultServer) -> None:
    """The files the rotation policies name: Vault's token and the S3 and Azure credentials, mode 600."""
    for name, text in (("vault-token", vault.root_token),
                       ("s3.yaml", f"access_key_id: {ACCESS_KEY}\nsecret_access_key: {SECRET}\n"),
                       ("azure.yaml", f"account_name: {ACCOUNT}\naccount_key: {ACCOUNT_KEY}\n")):
        (directory / name).write_text(text)
        (directory / name).chmod(0o600)


def rotation_policy(vault: VaultServer, s3: S3Upstream, azure: AzureBlobUpstream, ca_pem: Path, rules: str) -> str:
    """A policy on key `rot` in Vault, both upstreams and write_secret_files' files, with `rules`."""
    return f"""
version: 1
vault: {{addr: "{vault.addr}", ca_cert: "{ca_pem}", auth: {{method: token, token_file: vault-token}}}}
key_cache_ttl: 1
endpoints:
  - {{host: "127.0.0.1:{s3.port}", provider: s3}}
  - {{host: "127.0.0.1:{azure.port}", provider: azure}}
keys:
  rot: {{vault: {{path: secret/data/kc/rot}}}}
credentials:
  s3: {{file: s3.yaml, access_key_id: {ACCESS_KEY}}}
  azure: {{file: azure.yaml, account_name: {ACCOUNT}}}
rules:
{rules}"""


@pytest.fixture(scope="module")
def proxy(s3, azure, vault, ca_pem, keycourier_confdir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rotation")
    write_secret_files(workdir, vault)
    running = Keycourier(workdir, keycourier_confdir, rotation_policy(vault, s3, azure, ca_pem, f"""\
  - {{match: {{provider: s3, bucket: "rot-*"}}, action: encrypt, key: rot}}
  - {{match: {{provider: s3, bucket: "adopt-*"}}, action: encrypt, key: rot, plaintext_reads: allow}}
  - {{match: {{provider: s3, bucket: "strict-*"}}, action: encrypt, key: rot}}
  - {{match: {{provider: azure, account: {ACCOUNT}, bucket: rot}}, action: encrypt, key: rot}}
"""), upstream_ca=ca_pem)
    yield running
    running.stop()


@pytest.fixture
def app(proxy, s3, monkeypatch):
    """boto3 as a legacy application builds it: no key, no proxy code."""
    proxy.configure_application(monkeypatch, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET,
                                AWS_DEFAULT_REGION="us-east-1")
    return boto3.session.Session().client("s3", endpoint_url=s3.endpoint_url, config=Config(
        retries={"total_max_attempts": 1}, s3={"addressing_style": "path"}))


def direct(s3, ca_pem):
    """Straight to the upstream, as an operator with the keys could."""
    return boto3.session.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET).client(
        "s3", endpoint_url=s3.endpoint_url, region_name="us-east-1", verify=str(ca_pem),
        config=Config(retries={"total_max_attempts": 1}, proxies={}, s3={"addressing_style": "path"}))


def rotate_to(vault, key: bytes) -> None:
    """A new version in Vault; keycourier sees it once its 1 s cache has expired."""
    vault.kv_put("kc/rot", {"key": base64.b64encode(key).decode()})
    time.sleep(1.2)


def requests_for(upstream, name: str) -> int:
    return sum(name in r.path for r in list(upstream.requests))


def test_reads_survive_a_rotation_and_the_served_version_is_remembered(app, proxy, s3, vault, ca_pem):
    data = os.urandom(70_000)
    # Written under v1 before keycourier (re)started: keycourier knows nothing of it.
    direct(s3, ca_pem).put_object(Bucket="rot-a", Key="old.bin", Body=data, **sse_c(V1))
    app.put_object(Bucket="rot-a", Key="known.bin", Body=b"written through keycourier under v1")
    assert s3.stored("rot-a", "known.bin").sse_customer_key_md5 == md5_b64(V1)
    rotate_to(vault, V2)
    app.put_object(Bucket="rot-a", Key="new.bin", Body=b"under v2")
    assert s3.stored("rot-a", "new.bin").sse_customer_key_md5 == md5_b64(V2)  # writes use the newest version

    before = requests_for(s3, "old.bin")
    assert app.get_object(Bucket="rot-a", Key="old.bin")["Body"].read() == data
    assert requests_for(s3, "old.bin") - before == 2  # v2 refused by S3, then v1
    before = requests_for(s3, "old.bin")
    assert app.get_object(Bucket="rot-a", Key="old.bin", Range="bytes=1000-1999")["Body"].read() == data[1000:2000]
    assert app.head_object(Bucket="rot-a", Key="old.bin")["ContentLength"] == len(data)
    assert requests_for(s3, "old.bin") - before == 2  # remembered: straight to v1, no second try
    for name, content in (("new.bin", b"under v2"), ("known.bin", b"written through keycourier under v1")):
        before = requests_for(s3, name)
        assert app.get_object(Bucket="rot-a", Key=name)["Body"].read() == content
        assert requests_for(s3, name) - before == 1  # written through keycourier: its version is known
    assert "keycourier_key_version_fallbacks_total{key=\"rot\",outcome=\"older\"} 1.0" in proxy.scrape()[1]
    proxy.wait_for_log("op=GetObject")
    assert "key=rot v1" in proxy.log()  # the audit line names the version that served


def test_a_copy_reads_its_source_under_the_old_version_and_writes_the_newest(app, s3, vault, proxy):
    app.put_object(Bucket="rot-a", Key="copy-source.txt", Body=b"copy me")
    written_under = s3.stored("rot-a", "copy-source.txt").sse_customer_key_md5
    rotate_to(vault, os.urandom(32))
    app.copy_object(Bucket="rot-a", Key="copy-target.txt", CopySource={"Bucket": "rot-a", "Key": "copy-source.txt"})
    target = s3.stored("rot-a", "copy-target.txt")
    assert target.sse_customer_key_md5 != written_under
    assert app.get_object(Bucket="rot-a", Key="copy-target.txt")["Body"].read() == b"copy me"


def test_an_object_under_a_key_keycourier_never_had_gets_the_providers_answer_after_bounded_tries(app, s3, ca_pem, vault):
    direct(s3, ca_pem).put_object(Bucket="rot-a", Key="stranger.bin", Body=b"x", **sse_c(STRANGER))
    versions = len(vault.kv_live_versions("kc/rot"))
    before = requests_for(s3, "stranger.bin")
    with pytest.raises(ClientError) as refused:
        app.get_object(Bucket="rot-a", Key="stranger.bin")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert requests_for(s3, "stranger.bin") - before == versions  # one try per readable version, then stop


def test_plaintext_objects_are_read_only_where_the_rule_allows_it(app, s3, ca_pem):
    direct(s3, ca_pem).put_object(Bucket="adopt-a", Key="legacy.txt", Body=b"written before encryption")
    direct(s3, ca_pem).put_object(Bucket="strict-a", Key="legacy.txt", Body=b"written before encryption")
    assert app.get_object(Bucket="adopt-a", Key="legacy.txt")["Body"].read() == b"written before encryption"
    assert app.head_object(Bucket="adopt-a", Key="legacy.txt")["ContentLength"] == 25
    with pytest.raises(ClientError) as refused:
        app.get_object(Bucket="strict-a", Key="legacy.txt")
    headers = refused.value.response["ResponseMetadata"]["HTTPHeaders"]
    assert "plaintext_reads" in headers["x-keycourier-error"]
    app.put_object(Bucket="adopt-a", Key="new.txt", Body=b"encrypted")  # writes are always encrypted
    assert s3.stored("adopt-a", "new.txt").sse_customer_key_md5 is not None


def test_azure_blobs_stay_readable_across_a_rotation(proxy, azure, vault, monkeypatch):
    proxy.configure_application(monkeypatch)
    client = BlobServiceClient(account_url=azure.blob_url(ACCOUNT), retry_total=0,
                               credential={"account_name": ACCOUNT, "account_key": ACCOUNT_KEY})
    blob = client.get_blob_client("rot", "before.bin")
    blob.upload_blob(b"azure data under the old key", overwrite=True)
    old = azure.stored(ACCOUNT, "rot", "before.bin").encryption_key_sha256
    rotate_to(vault, os.urandom(32))
    assert blob.download_blob().readall() == b"azure data under the old key"
    assert blob.download_blob(offset=6, length=4).readall() == b"data"
    assert blob.get_blob_properties().size == 28
    # As a Put Blob From URL source: the source key falls back to the old version, the copy gets the newest.
    sas = generate_blob_sas(ACCOUNT, "rot", "before.bin", account_key=ACCOUNT_KEY, permission=BlobSasPermissions(read=True),
                            expiry=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    copy = client.get_blob_client("rot", "copied.bin")
    copy.upload_blob_from_url(azure.blob_url(ACCOUNT, "rot", "before.bin") + "?" + sas, overwrite=True)
    assert azure.stored(ACCOUNT, "rot", "copied.bin").encryption_key_sha256 != old
    assert copy.download_blob().readall() == b"azure data under the old key"
    blob.set_blob_metadata({"rotated": "no"})
    assert azure.stored(ACCOUNT, "rot", "before.bin").encryption_key_sha256 == old  # still its own key
    with pytest.raises(HttpResponseError):
        client.get_blob_client("rot", "missing.bin").download_blob()
