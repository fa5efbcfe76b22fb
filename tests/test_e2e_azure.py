"""End to end: the real keycourier process between the real azure-storage-blob SDK and a strict Azure Blob
upstream, keys from the Vault-API server. The application has only HTTPS_PROXY and REQUESTS_CA_BUNDLE."""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os

import pytest
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobBlock, BlobClient, BlobSasPermissions, BlobServiceClient, generate_blob_sas

from tests.conftest import Keycourier
from tests.digests import sha256_b64
from tests.upstreams.azure import AzureBlobUpstream
from tests.upstreams.vault import VaultServer

ACCOUNT = "legacyacct"
ACCOUNT_KEY = base64.b64encode(b"keycourier-e2e-azure-account-key-0000000000000000000000").decode()
KEYS = {name: os.urandom(32) for name in ("payroll", "archive")}


@pytest.fixture(scope="module")
def upstream(ca):
    with AzureBlobUpstream(ca, {ACCOUNT: ACCOUNT_KEY}) as server:
        for container in ("payroll", "archive", "public", "secret"):
            server.create_container(ACCOUNT, container)
        yield server
    assert server.internal_errors == []


@pytest.fixture(scope="module")
def keycourier(upstream, ca, ca_pem, keycourier_confdir, tmp_path_factory):
    vault = VaultServer(ca).start()
    for name, key in KEYS.items():
        vault.kv_put(f"keycourier/{name}", {"key": base64.b64encode(key).decode()})
    vault.kv_put("keycourier/azure-legacyacct", {"account_name": ACCOUNT, "account_key": ACCOUNT_KEY})
    vault.set_policy("keycourier", {"secret/data/keycourier/*": ["read"]})
    role_id, secret_id = vault.add_approle("keycourier", token_policies=["keycourier"])
    workdir = tmp_path_factory.mktemp("keycourier-azure")
    (workdir / "secret-id").write_text(secret_id)
    policy = f"""version: 1
vault: {{addr: "{vault.addr}", ca_cert: "{ca_pem}", auth: {{method: approle, role_id: {role_id}, secret_id_file: secret-id}}}}
endpoints:
  - {{host: "127.0.0.1:{upstream.port}", provider: azure}}
keys:
  payroll: {{vault: {{path: secret/data/keycourier/payroll}}}}
  archive: {{vault: {{path: secret/data/keycourier/archive}}}}
credentials:
  legacyacct: {{vault: {{path: secret/data/keycourier/azure-legacyacct}}}}
rules:
  - {{match: {{provider: azure, account: {ACCOUNT}, bucket: "payroll"}}, action: encrypt, key: payroll}}
  - {{match: {{provider: azure, account: {ACCOUNT}, bucket: "archive"}}, action: encrypt, key: archive}}
  - {{match: {{provider: azure, bucket: "public"}}, action: passthrough}}
  - {{match: {{provider: "*"}}, action: deny}}
"""
    proxy = Keycourier(workdir, keycourier_confdir, policy, upstream_ca=ca_pem)
    yield proxy
    proxy.stop()
    vault.stop()


@pytest.fixture
def app(keycourier, monkeypatch):
    keycourier.configure_application(monkeypatch)
    return keycourier


def service(upstream, account_key=ACCOUNT_KEY) -> BlobServiceClient:
    """The SDK as a legacy application builds it: no encryption code, no proxy code."""
    return BlobServiceClient(account_url=upstream.blob_url(ACCOUNT), retry_total=0,
                             credential={"account_name": ACCOUNT, "account_key": account_key})


def status_of(call) -> int:
    with pytest.raises(HttpResponseError) as raised:
        call()
    return raised.value.status_code


def test_upload_download_and_range_are_encrypted_with_the_vault_key(app, upstream, ca_pem, monkeypatch):
    blob = service(upstream).get_blob_client("payroll", "q3/report.bin")
    data = os.urandom(300_000)
    blob.upload_blob(data, overwrite=True)
    stored = upstream.stored(ACCOUNT, "payroll", "q3/report.bin")
    assert stored.encryption_key_sha256 == sha256_b64(KEYS["payroll"])
    assert data[:64] not in stored.data_on_disk
    assert blob.download_blob().readall() == data
    assert blob.download_blob(offset=1000, length=1000).readall() == data[1000:2000]
    assert blob.get_blob_properties().size == len(data)
    # Straight to the upstream, without keycourier, the blob cannot be read: Azure wants the key.
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name)
    direct = BlobClient.from_blob_url(upstream.blob_url(ACCOUNT, "payroll", "q3/report.bin"), connection_verify=str(ca_pem),
                                      credential={"account_name": ACCOUNT, "account_key": ACCOUNT_KEY}, retry_total=0)
    assert status_of(direct.download_blob) == 409


def test_staged_blocks_and_metadata(app, upstream):
    blob = service(upstream).get_blob_client("payroll", "staged.bin")
    blocks = [os.urandom(50_000) for _ in range(3)]
    for n, block in enumerate(blocks):
        blob.stage_block(f"block-{n:03d}", block)
    blob.commit_block_list([BlobBlock(f"block-{n:03d}") for n in range(3)])
    assert upstream.stored(ACCOUNT, "payroll", "staged.bin").encryption_key_sha256 == sha256_b64(KEYS["payroll"])
    blob.set_blob_metadata({"owner": "hr"})
    assert blob.get_blob_properties().metadata == {"owner": "hr"}
    assert blob.download_blob().readall() == b"".join(blocks)


def test_copy_into_an_encrypted_container_uses_put_blob_from_url_with_both_keys(app, upstream):
    client = service(upstream)
    client.get_blob_client("payroll", "to-copy.txt").upload_blob(b"salary data", overwrite=True)
    sas = generate_blob_sas(ACCOUNT, "payroll", "to-copy.txt", account_key=ACCOUNT_KEY,
                            permission=BlobSasPermissions(read=True), expiry=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    source = upstream.blob_url(ACCOUNT, "payroll", "to-copy.txt") + "?" + sas
    copied = client.get_blob_client("archive", "copied.txt")
    copied.upload_blob_from_url(source, overwrite=True)
    assert upstream.stored(ACCOUNT, "archive", "copied.txt").encryption_key_sha256 == sha256_b64(KEYS["archive"])
    assert copied.download_blob().readall() == b"salary data"
    # Copy Blob takes no customer key, so into an encrypt container it would store a plain blob: refused.
    assert status_of(lambda: copied.start_copy_from_url(source)) == 403


def test_sas_requests_get_the_key_without_re_signing(app, upstream):
    service(upstream).get_blob_client("payroll", "shared.txt").upload_blob(b"via sas", overwrite=True)
    sas = generate_blob_sas(ACCOUNT, "payroll", "shared.txt", account_key=ACCOUNT_KEY,
                            permission=BlobSasPermissions(read=True), expiry=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    by_sas = BlobClient.from_blob_url(upstream.blob_url(ACCOUNT, "payroll", "shared.txt") + "?" + sas, retry_total=0)
    assert by_sas.download_blob().readall() == b"via sas"


def test_passthrough_container_is_forwarded_unchanged(app, upstream):
    upstream.clear_requests()
    service(upstream).get_blob_client("public", "index.html").upload_blob(b"<p>hi</p>", overwrite=True)
    received = {k.lower() for k, _ in upstream.requests[-1].headers}
    assert not received & {"x-ms-encryption-key", "x-ms-encryption-key-sha256"}
    assert upstream.stored(ACCOUNT, "public", "index.html").encryption_key_sha256 is None


def test_deny_and_a_wrong_account_key_are_refused_before_forwarding(app, upstream):
    upstream.clear_requests()
    assert status_of(lambda: service(upstream).get_blob_client("secret", "a").upload_blob(b"x", overwrite=True)) == 403
    wrong = base64.b64encode(b"not-the-account-key-000000000000000000000000000000000000").decode()
    assert status_of(lambda: service(upstream, wrong).get_blob_client("payroll", "a").upload_blob(b"x", overwrite=True)) == 403
    assert upstream.requests == []


def test_no_key_in_the_log_or_the_saved_flows(app, upstream):
    service(upstream).get_blob_client("payroll", "leak-check.txt").upload_blob(b"x", overwrite=True)
    app.wait_for_log(sha256_b64(KEYS["payroll"]))  # the fingerprint Azure keeps is logged
    saved = app.flows_path.read_bytes()
    assert b"[redacted by keycourier]" in saved
    for place in (app.log().encode(), saved):
        for key in KEYS.values():
            assert base64.b64encode(key) not in place and key not in place
        assert ACCOUNT_KEY.encode() not in place


def test_s3_sse_c_headers_sent_to_azure_are_translated_into_cpk(app, upstream):
    """An application that speaks S3's SSE-C dialect to Azure gets CPK (SHA-256 computed), and SSE-C back."""
    own_key = os.urandom(32)
    md5 = base64.b64encode(hashlib.md5(own_key).digest()).decode()
    sse_c = {"x-amz-server-side-encryption-customer-algorithm": "AES256",
             "x-amz-server-side-encryption-customer-key": base64.b64encode(own_key).decode(),
             "x-amz-server-side-encryption-customer-key-MD5": md5}
    answers = []
    blob = service(upstream).get_blob_client("public", "translated.txt")
    blob.upload_blob(b"spoken in S3's dialect", overwrite=True, headers=sse_c,
                     raw_response_hook=lambda response: answers.append(response.http_response.headers))
    assert upstream.stored(ACCOUNT, "public", "translated.txt").encryption_key_sha256 == sha256_b64(own_key)
    assert answers[-1]["x-amz-server-side-encryption-customer-key-MD5"] == md5
    assert "x-ms-encryption-key-sha256" not in answers[-1]
    assert blob.download_blob(headers=sse_c).readall() == b"spoken in S3's dialect"
    # A key that does not match its MD5 is refused, not forwarded.
    upstream.clear_requests()
    bad = {**sse_c, "x-amz-server-side-encryption-customer-key-MD5": base64.b64encode(bytes(16)).decode()}
    assert status_of(lambda: blob.upload_blob(b"x", overwrite=True, headers=bad)) == 400
    assert upstream.requests == []
