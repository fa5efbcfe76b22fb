"""The Azure Blob test upstream, driven directly by the real azure-storage-blob SDK (no proxy).

`ca` and `ca_pem` (the test CA and its PEM file) come from tests/conftest.py.
"""

import base64
import datetime as dt
import hashlib
import http.client
import socket
import ssl
import xml.etree.ElementTree as ET
from email.utils import format_datetime

import pytest
from azure.core import MatchConditions
from azure.core.exceptions import HttpResponseError
from azure.core.pipeline.policies import SansIOHTTPPolicy
from azure.storage.blob import (
    BlobBlock,
    BlobClient,
    BlobSasPermissions,
    BlobServiceClient,
    ContentSettings,
    CustomerProvidedEncryptionKey,
    generate_blob_sas,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.upstreams.azure import AzureBlobUpstream, shared_key_signature

ACCOUNT = "acct"
ACCOUNT_KEY = base64.b64encode(b"upstream-test-account-key-0000000000000000000000000000000").decode()
KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
# The example key and hash from Azure's announcement of customer-provided keys.
SEED_KEY = "MDEyMzQ1NjcwMTIzNDU2NzAxMjM0NTY3MDEyMzQ1Njc="
SEED_KEY_SHA256 = "3QFFFpRA5+XANHqwwbT4yXDmrT/2JaLt/FKHjzhOdoE="
API_VERSION = "2025-01-05"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def cpk(key: bytes) -> CustomerProvidedEncryptionKey:
    return CustomerProvidedEncryptionKey(b64(key), b64(hashlib.sha256(key).digest()))


def fails(operation, *args, **kwargs) -> HttpResponseError:
    with pytest.raises(HttpResponseError) as raised:
        operation(*args, **kwargs)
    return raised.value


def error_code(error: HttpResponseError) -> tuple[int, str]:
    return error.status_code, error.response.headers.get("x-ms-error-code")


@pytest.fixture(autouse=True)
def no_env_proxies(monkeypatch):
    # The SDK's requests session honours *_PROXY variables; the upstream is local.
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def upstream(ca):
    with AzureBlobUpstream(ca, {ACCOUNT: ACCOUNT_KEY}) as server:
        server.create_container(ACCOUNT, "box")
        yield server
    assert not server.internal_errors


def client_for(upstream, ca_pem, *, account_key=ACCOUNT_KEY, **kwargs) -> BlobServiceClient:
    return BlobServiceClient(account_url=upstream.blob_url(ACCOUNT),
                             credential={"account_name": ACCOUNT, "account_key": account_key},
                             connection_verify=str(ca_pem), retry_total=0, **kwargs)


@pytest.fixture
def service(upstream, ca_pem) -> BlobServiceClient:
    return client_for(upstream, ca_pem)


@pytest.fixture
def box(service):
    return service.get_container_client("box")


def signed_request(upstream, method: str, path: str, headers: dict[str, str | None], body: bytes = b"",
                   *, host: str | None = None, ca_pem=None):
    """Send a SharedKey-signed request with http.client, for what the SDK refuses to send.

    A header given as None is left out.
    """
    host = host or f"127.0.0.1:{upstream.port}"
    headers = {"x-ms-version": API_VERSION, "x-ms-date": format_datetime(dt.datetime.now(dt.UTC), usegmt=True),
               "Content-Length": str(len(body)), **headers}
    headers = {name: value for name, value in headers.items() if value is not None}
    url = f"{upstream.endpoint_url.partition('://')[0]}://{host}{path}"
    signature = shared_key_signature(ACCOUNT, ACCOUNT_KEY, method, url, list(headers.items()))
    headers["Authorization"] = f"SharedKey {ACCOUNT}:{signature}"
    headers["Host"] = host
    if upstream.tls:
        context = ssl.create_default_context(cafile=str(ca_pem))
        connection = http.client.HTTPSConnection("127.0.0.1", upstream.port, context=context)
    else:
        connection = http.client.HTTPConnection("127.0.0.1", upstream.port)
    connection.request(method, path, body, headers)
    response = connection.getresponse()
    result = response.status, dict(response.getheaders()), response.read()
    connection.close()
    return result


# --- customer-provided keys -----------------------------------------------------------

def test_cpk_upload_download_round_trip(upstream, box):
    data = b"legacy app data " * 100
    box.upload_blob("file.bin", data, cpk=cpk(KEY_A))

    assert box.download_blob("file.bin", cpk=cpk(KEY_A)).readall() == data
    stored = upstream.stored(ACCOUNT, "box", "file.bin")
    assert stored.encryption_key_sha256 == b64(hashlib.sha256(KEY_A).digest())
    assert stored.size == len(data)
    assert stored.blob_type == "BlockBlob"
    assert data not in stored.data_on_disk
    # Sealed under the customer's key: AES-256-GCM, nonce first.
    assert AESGCM(KEY_A).decrypt(stored.data_on_disk[:12], stored.data_on_disk[12:], None) == data
    put, get = [r for r in upstream.requests if r.path == "/acct/box/file.bin"]
    assert put.header("x-ms-encryption-key") == b64(KEY_A)
    assert get.status == 206  # the SDK's first GET asks for a range


def test_cpk_write_and_read_echo_key_hash(upstream, box):
    key_hash = b64(hashlib.sha256(KEY_A).digest())
    uploaded = box.get_blob_client("file.bin").upload_blob(b"data", cpk=cpk(KEY_A))
    assert uploaded["request_server_encrypted"] is True
    assert uploaded["encryption_key_sha256"] == key_hash
    downloaded = box.download_blob("file.bin", cpk=cpk(KEY_A))
    assert downloaded.properties.server_encrypted is True
    assert downloaded.properties.encryption_key_sha256 == key_hash


def test_seed_vector_key_is_accepted(upstream, box):
    seed = CustomerProvidedEncryptionKey(SEED_KEY, SEED_KEY_SHA256)
    box.upload_blob("seed.txt", b"seed", cpk=seed)
    assert upstream.stored(ACCOUNT, "box", "seed.txt").encryption_key_sha256 == SEED_KEY_SHA256
    assert box.download_blob("seed.txt", cpk=seed).readall() == b"seed"


def test_reading_cpk_blob_without_key_is_409(box):
    box.upload_blob("file.bin", b"secret", cpk=cpk(KEY_A))
    error = fails(box.download_blob, "file.bin")
    assert error_code(error) == (409, "BlobUsesCustomerSpecifiedEncryption")
    assert error_code(fails(box.get_blob_client("file.bin").get_blob_properties)) == \
        (409, "BlobUsesCustomerSpecifiedEncryption")


def test_reading_cpk_blob_with_wrong_key_is_409_mismatch(box):
    box.upload_blob("file.bin", b"secret", cpk=cpk(KEY_A))
    assert error_code(fails(box.download_blob, "file.bin", cpk=cpk(KEY_B))) == (409, "BlobCustomerSpecifiedEncryptionMismatch")


def test_key_hash_must_match_key(upstream, box):
    mismatched = CustomerProvidedEncryptionKey(b64(KEY_A), b64(hashlib.sha256(KEY_B).digest()))
    error = fails(box.upload_blob, "file.bin", b"data", cpk=mismatched)
    assert error_code(error) == (400, "InvalidHeaderValue")
    assert "file.bin" not in [blob.name for blob in box.list_blobs()]


def test_key_on_plain_blob_is_refused(box):
    box.upload_blob("plain.txt", b"plain")
    error = fails(box.download_blob, "plain.txt", cpk=cpk(KEY_A))
    assert error_code(error) == (409, "BlobDoesNotUseCustomerSpecifiedEncryption")
    assert error.message.startswith("The blob is not encrypted with customer specified encryption, but one "
                                    "was provided in the request.")


def test_algorithm_header_is_optional_on_reads_only(upstream, box, ca_pem):
    box.upload_blob("file.bin", b"secret", cpk=cpk(KEY_A))
    key_only = {"x-ms-encryption-key": b64(KEY_A), "x-ms-encryption-key-sha256": b64(hashlib.sha256(KEY_A).digest())}
    status, headers, body = signed_request(upstream, "GET", "/acct/box/file.bin", key_only, ca_pem=ca_pem)
    assert (status, body) == (200, b"secret")
    status, _, _ = signed_request(upstream, "HEAD", "/acct/box/file.bin", key_only, ca_pem=ca_pem)
    assert status == 200
    status, headers, _ = signed_request(upstream, "PUT", "/acct/box/file.bin",
                                        {"x-ms-blob-type": "BlockBlob", **key_only}, b"new", ca_pem=ca_pem)
    assert (status, headers["x-ms-error-code"]) == (400, "MissingRequiredHeader")


def test_plain_http_upstream_refuses_cpk():
    with AzureBlobUpstream(None, {ACCOUNT: ACCOUNT_KEY}, tls=False) as upstream:
        upstream.create_container(ACCOUNT, "box")
        status, headers, body = signed_request(upstream, "PUT", "/acct/box/file.bin", {
            "x-ms-blob-type": "BlockBlob", "x-ms-encryption-key": SEED_KEY,
            "x-ms-encryption-key-sha256": SEED_KEY_SHA256, "x-ms-encryption-algorithm": "AES256",
        }, b"data")
        assert (status, headers["x-ms-error-code"]) == (400, "InvalidInput")
        assert ET.fromstring(body).findtext("Code") == "InvalidInput"
        # The same request without a key is fine over HTTP.
        status, _, _ = signed_request(upstream, "PUT", "/acct/box/file.bin", {"x-ms-blob-type": "BlockBlob"},
                                      b"data")
        assert status == 201


def test_range_download(upstream, box):
    data = bytes(range(256)) * 4
    box.upload_blob("file.bin", data, cpk=cpk(KEY_A))
    upstream.clear_requests()
    assert box.download_blob("file.bin", offset=100, length=50, cpk=cpk(KEY_A)).readall() == data[100:150]
    (get,) = upstream.requests
    assert get.header("x-ms-range") == "bytes=100-149"
    assert get.status == 206


def test_range_past_end_is_416(box):
    box.upload_blob("file.bin", b"short")
    error = fails(box.download_blob, "file.bin", offset=10, length=5)
    assert error_code(error) == (416, "InvalidRange")


def test_stage_and_commit_blocks_with_cpk(upstream, box):
    blob = box.get_blob_client("big.bin")
    for block_id, data in (("block-1", b"first,"), ("block-2", b"second"), ("block-3", b"unused")):
        blob.stage_block(block_id, data, cpk=cpk(KEY_A))  # the SDK base64-encodes the ids
    blob.commit_block_list([BlobBlock("block-1"), BlobBlock("block-2")], cpk=cpk(KEY_A))

    assert blob.download_blob(cpk=cpk(KEY_A)).readall() == b"first,second"
    stored = upstream.stored(ACCOUNT, "box", "big.bin")
    assert stored.committed_blocks == (b64(b"block-1"), b64(b"block-2"))
    assert stored.uncommitted_blocks == ()  # committing discards the unused block
    assert stored.encryption_key_sha256 == b64(hashlib.sha256(KEY_A).digest())
    assert b"first" not in stored.data_on_disk


def test_staged_blocks_are_uncommitted_until_commit(upstream, box):
    blob = box.get_blob_client("big.bin")
    blob.upload_blob(b"old", cpk=cpk(KEY_A))
    blob.stage_block("block-1", b"new", cpk=cpk(KEY_A))
    stored = upstream.stored(ACCOUNT, "box", "big.bin")
    assert (stored.size, stored.uncommitted_blocks) == (3, (b64(b"block-1"),))
    assert error_code(fails(blob.stage_block, "block-2", b"new")) == (409, "BlobUsesCustomerSpecifiedEncryption")


def test_commit_needs_the_key_the_blocks_were_staged_with(upstream, box):
    blob = box.get_blob_client("big.bin")
    blob.stage_block("block-1", b"first", cpk=cpk(KEY_A))
    error = fails(blob.commit_block_list, [BlobBlock("block-1")])
    assert error_code(error) == (409, "BlobUsesCustomerSpecifiedEncryption")
    assert error_code(fails(blob.commit_block_list, [BlobBlock("block-1")], cpk=cpk(KEY_B))) == (409, "BlobCustomerSpecifiedEncryptionMismatch")


def test_commit_of_unknown_block_is_invalid_block_list(box):
    blob = box.get_blob_client("big.bin")
    error = fails(blob.commit_block_list, [BlobBlock("nope")])
    assert error_code(error) == (400, "InvalidBlockList")


def test_properties_and_metadata_with_cpk(upstream, box):
    blob = box.get_blob_client("file.bin")
    blob.upload_blob(b"data", metadata={"owner": "legacy"}, content_settings=ContentSettings("text/plain"),
                     cpk=cpk(KEY_A))
    properties = blob.get_blob_properties(cpk=cpk(KEY_A))
    assert properties.size == 4
    assert properties.content_settings.content_type == "text/plain"
    assert properties.metadata == {"owner": "legacy"}
    assert properties.encryption_key_sha256 == b64(hashlib.sha256(KEY_A).digest())

    blob.set_blob_metadata({"owner": "proxy"}, cpk=cpk(KEY_A))
    assert upstream.stored(ACCOUNT, "box", "file.bin").metadata == {"owner": "proxy"}
    assert error_code(fails(blob.set_blob_metadata, {"owner": "nobody"})) == \
        (409, "BlobUsesCustomerSpecifiedEncryption")


def test_list_and_delete_blobs(upstream, box):
    box.upload_blob("a.txt", b"a")
    box.upload_blob("b.txt", b"bb", cpk=cpk(KEY_A))
    box.upload_blob("c.txt", b"ccc")
    listed = {blob.name: blob for blob in box.list_blobs(results_per_page=2)}
    assert set(listed) == {"a.txt", "b.txt", "c.txt"}
    assert listed["b.txt"].size == 2
    assert [r.status for r in upstream.requests if ("comp", "list") in r.query] == [200, 200]  # two pages
    box.delete_blob("c.txt")
    box.delete_blob("a.txt")
    assert [blob.name for blob in box.list_blobs()] == ["b.txt"]
    assert error_code(fails(box.delete_blob, "a.txt")) == (404, "BlobNotFound")


def test_upload_without_overwrite_refuses_existing_blob(upstream, box):
    box.upload_blob("file.txt", b"first")
    # upload_blob defaults to overwrite=False, which the SDK sends as If-None-Match: *.
    assert error_code(fails(box.upload_blob, "file.txt", b"second")) == (409, "BlobAlreadyExists")
    box.upload_blob("file.txt", b"second", overwrite=True)
    assert box.download_blob("file.txt").readall() == b"second"


def test_if_match_on_stale_etag_is_412(box):
    blob = box.get_blob_client("file.txt")
    stale = blob.upload_blob(b"v1")["etag"]
    blob.upload_blob(b"v2", overwrite=True)
    error = fails(blob.set_blob_metadata, {"k": "v"}, etag=stale, match_condition=MatchConditions.IfNotModified)
    assert error_code(error) == (412, "ConditionNotMet")


def test_unimplemented_query_parameter_is_refused(box):
    box.upload_blob("file.txt", b"data")
    assert error_code(fails(lambda: list(box.walk_blobs(delimiter="/")))) == (501, "NotImplemented")


# --- copy -----------------------------------------------------------------------------

def test_copy_blob_completes_immediately(upstream, box):
    box.upload_blob("source.txt", b"copy me", metadata={"origin": "source"})
    target = box.get_blob_client("target.txt")
    copy = target.start_copy_from_url(box.get_blob_client("source.txt").url)
    assert copy["copy_status"] == "success"
    assert target.download_blob().readall() == b"copy me"
    assert upstream.stored(ACCOUNT, "box", "target.txt").metadata == {"origin": "source"}


def test_copy_blob_from_cpk_source_cannot_verify_source(box):
    box.upload_blob("source.txt", b"secret", cpk=cpk(KEY_A))
    target = box.get_blob_client("target.txt")
    error = fails(target.start_copy_from_url, box.get_blob_client("source.txt").url)
    assert error_code(error) == (409, "CannotVerifyCopySource")


def sas_url(blob_client, permission: str = "r", expiry: dt.timedelta = dt.timedelta(hours=1)) -> str:
    token = generate_blob_sas(ACCOUNT, blob_client.container_name, blob_client.blob_name, account_key=ACCOUNT_KEY,
                              permission=BlobSasPermissions.from_string(permission),
                              expiry=dt.datetime.now(dt.UTC) + expiry)
    return f"{blob_client.url}?{token}"


def test_copy_blob_from_url_needs_an_authorized_source(upstream, box):
    box.upload_blob("source.txt", b"copy me")
    source = box.get_blob_client("source.txt")
    target = box.get_blob_client("target.txt")
    error = fails(target.start_copy_from_url, source.url, requires_sync=True)
    assert error_code(error) == (404, "CannotVerifyCopySource")
    copy = target.start_copy_from_url(sas_url(source), requires_sync=True)
    assert copy["copy_status"] == "success"
    assert target.download_blob().readall() == b"copy me"


def test_put_blob_from_url_rekeys_cpk_blob(upstream, box):
    box.upload_blob("source.bin", b"rotate me", cpk=cpk(KEY_A))
    source_url = sas_url(box.get_blob_client("source.bin"))
    target = box.get_blob_client("target.bin")
    error = fails(target.upload_blob_from_url, source_url, cpk=cpk(KEY_B))
    assert error_code(error) == (409, "CannotVerifyCopySource")
    target.upload_blob_from_url(source_url, source_cpk=cpk(KEY_A), cpk=cpk(KEY_B))
    assert target.download_blob(cpk=cpk(KEY_B)).readall() == b"rotate me"
    assert upstream.stored(ACCOUNT, "box", "target.bin").encryption_key_sha256 == \
        b64(hashlib.sha256(KEY_B).digest())


def test_stage_block_from_url_with_source_cpk(upstream, box):
    box.upload_blob("source.bin", b"0123456789", cpk=cpk(KEY_A))
    source_url = sas_url(box.get_blob_client("source.bin"))
    target = box.get_blob_client("target.bin")
    target.stage_block_from_url("block-1", source_url, source_offset=2, source_length=5,
                                source_cpk=cpk(KEY_A), cpk=cpk(KEY_B))
    target.commit_block_list([BlobBlock("block-1")], cpk=cpk(KEY_B))
    assert target.download_blob(cpk=cpk(KEY_B)).readall() == b"23456"


# --- authentication -------------------------------------------------------------------

class _SetHeaderAfterSigning(SansIOHTTPPolicy):
    def __init__(self, name: str, value: str):
        super().__init__()
        self.name, self.value = name, value

    def on_request(self, request):
        request.http_request.headers[self.name] = self.value


@pytest.mark.parametrize("name", ["x-ms-meta-added", "x-ms-client-request-id"])
def test_x_ms_header_set_after_signing_is_403(upstream, ca_pem, name):
    # _additional_pipeline_policies run after the SDK's SharedKey policy has signed.
    service = client_for(upstream, ca_pem, _additional_pipeline_policies=[_SetHeaderAfterSigning(name, "changed")])
    error = fails(service.get_container_client("box").upload_blob, "file.bin", b"data")
    assert error_code(error) == (403, "AuthenticationFailed")


def test_wrong_account_key_is_403(upstream, ca_pem):
    wrong = base64.b64encode(b"not the account key").decode()
    error = fails(client_for(upstream, ca_pem, account_key=wrong).get_container_client("box").upload_blob,
                  "file.bin", b"data")
    assert error_code(error) == (403, "AuthenticationFailed")


def test_stale_date_is_403(upstream, ca_pem):
    stale = format_datetime(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=16), usegmt=True)
    status, headers, body = signed_request(upstream, "GET", "/acct/box?restype=container&comp=list",
                                           {"x-ms-date": stale}, ca_pem=ca_pem)
    assert (status, headers["x-ms-error-code"]) == (403, "AuthenticationFailed")
    assert "too old" in ET.fromstring(body).findtext("AuthenticationErrorDetail")


def test_anonymous_request_is_404(upstream, ca_pem):
    context = ssl.create_default_context(cafile=str(ca_pem))
    connection = http.client.HTTPSConnection("127.0.0.1", upstream.port, context=context)
    connection.request("GET", "/acct/box/file.bin")
    response = connection.getresponse()
    assert (response.status, response.getheader("x-ms-error-code")) == (404, "ResourceNotFound")


def test_missing_version_is_400(upstream, ca_pem):
    status, headers, _ = signed_request(upstream, "GET", "/acct/box?restype=container&comp=list",
                                        {"x-ms-version": None}, ca_pem=ca_pem)
    assert (status, headers["x-ms-error-code"]) == (400, "MissingRequiredHeader")


def test_certificate_covers_account_host_names(upstream, ca_pem):
    context = ssl.create_default_context(cafile=str(ca_pem))
    with socket.create_connection(("127.0.0.1", upstream.port)) as raw:
        with context.wrap_socket(raw, server_hostname=f"{ACCOUNT}.blob.core.windows.net") as tls:
            assert ("DNS", "*.blob.core.windows.net") in tls.getpeercert()["subjectAltName"]


def test_account_host_addressing(upstream, ca_pem):
    host = f"{ACCOUNT}.blob.core.windows.net"
    status, _, _ = signed_request(upstream, "PUT", "/box/hosted.txt", {"x-ms-blob-type": "BlockBlob"}, b"hi",
                                  host=host, ca_pem=ca_pem)
    assert status == 201
    assert upstream.stored(ACCOUNT, "box", "hosted.txt").size == 2


def test_unknown_operation_is_an_azure_error(upstream, ca_pem):
    status, headers, body = signed_request(upstream, "PUT", "/acct/box/file.bin?comp=tier",
                                           {"x-ms-access-tier": "Cool"}, ca_pem=ca_pem)
    assert (status, headers["x-ms-error-code"]) == (501, "NotImplemented")
    assert ET.fromstring(body).findtext("Code") == "NotImplemented"


def test_blob_sas_grants_what_it_says(upstream, box, ca_pem):
    box.upload_blob("file.txt", b"shared")
    blob = box.get_blob_client("file.txt")
    reader = BlobClient.from_blob_url(sas_url(blob), connection_verify=str(ca_pem), retry_total=0)
    assert reader.download_blob().readall() == b"shared"
    assert error_code(fails(reader.upload_blob, b"overwrite", overwrite=True)) == \
        (403, "AuthorizationPermissionMismatch")
    expired = BlobClient.from_blob_url(sas_url(blob, expiry=dt.timedelta(minutes=-1)),
                                       connection_verify=str(ca_pem), retry_total=0)
    assert error_code(fails(expired.download_blob)) == (403, "AuthenticationFailed")
    tampered = BlobClient.from_blob_url(sas_url(blob).replace("sp=r", "sp=rw"), connection_verify=str(ca_pem),
                                        retry_total=0)
    assert error_code(fails(tampered.upload_blob, b"overwrite", overwrite=True)) == (403, "AuthenticationFailed")
