"""End to end: the real keycourier process between the real oss2 SDK and a strict OSS upstream.
The application is configured with the proxy and the CA bundle only (HTTPS_PROXY, REQUESTS_CA_BUNDLE)."""
from __future__ import annotations

import base64
import hashlib
import os

import oss2
import pytest

from tests.conftest import Keycourier
from tests.upstreams.oss import OssUpstream

ACCESS_KEY, SECRET = "LTAIkeycourierE2E001", "oss-e2e-secret-for-tests-only-01"
KMS_KEY_ID = "9468da86-3509-4f8d-a61e-6eab1eac0042"
MAPPED_KEY = os.urandom(32)  # a customer key the policy maps to a KMS key, for translation
MAPPED_KMS_KEY_ID = "kms-for-the-mapped-customer-key"
SSE = "x-oss-server-side-encryption"


@pytest.fixture(scope="module")
def upstream(ca):
    with OssUpstream(ca, {ACCESS_KEY: SECRET}) as server:
        for bucket in ("kms-payroll", "aes-archive", "open-web", "secret-x"):
            server.create_bucket(bucket)
        yield server
    assert server.internal_errors == []


@pytest.fixture(scope="module")
def keycourier(upstream, ca_pem, keycourier_confdir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("keycourier-oss")
    (workdir / "app.yaml").write_text(f"access_key_id: {ACCESS_KEY}\nsecret_access_key: {SECRET}\n")
    (workdir / "app.yaml").chmod(0o600)
    policy = f"""version: 1
endpoints:
  - {{host: "127.0.0.1:{upstream.port}", provider: oss}}
credentials:
  app: {{file: app.yaml}}
oss_kms_key_ids:
  "{sha256_b64(MAPPED_KEY)}": {MAPPED_KMS_KEY_ID}
rules:
  - {{match: {{provider: oss, bucket: "kms-*"}}, action: encrypt, oss_sse: KMS, kms_key_id: "{KMS_KEY_ID}"}}
  - {{match: {{provider: oss, bucket: "aes-*"}}, action: encrypt, oss_sse: AES256}}
  - {{match: {{provider: oss, bucket: "open-*"}}, action: passthrough}}
  - {{match: {{provider: "*"}}, action: deny}}
"""
    proxy = Keycourier(workdir, keycourier_confdir, policy, upstream_ca=ca_pem)
    yield proxy
    proxy.stop()


@pytest.fixture
def app(keycourier, monkeypatch):
    """oss2 as a legacy application uses it: no encryption code, only the environment."""
    keycourier.configure_application(monkeypatch)
    return keycourier


def sha256_b64(key: bytes) -> str:
    return base64.b64encode(hashlib.sha256(key).digest()).decode()


def sse_c_headers(key: bytes) -> dict[str, str]:
    return {"x-amz-server-side-encryption-customer-algorithm": "AES256",
            "x-amz-server-side-encryption-customer-key": base64.b64encode(key).decode(),
            "x-amz-server-side-encryption-customer-key-MD5": base64.b64encode(hashlib.md5(key).digest()).decode()}


def bucket(upstream, name, auth=None):
    return oss2.Bucket(auth or oss2.Auth(ACCESS_KEY, SECRET), upstream.endpoint_url, name)


def sse_headers_seen(upstream, method, path_part):
    """The SSE header value on each matching request the upstream received."""
    return [dict((k.lower(), v) for k, v in r.headers).get(SSE) for r in upstream.requests
            if r.method == method and path_part in r.path]


def test_put_and_get_are_stored_with_the_rules_kms_key(app, upstream):
    data = os.urandom(100_000)
    bucket(upstream, "kms-payroll").put_object("q3.csv", data)
    stored = upstream.stored("kms-payroll", "q3.csv")
    assert (stored.server_side_encryption, stored.kms_key_id) == ("KMS", KMS_KEY_ID)
    upstream.clear_requests()
    result = bucket(upstream, "kms-payroll").get_object("q3.csv", byte_range=(10, 19))
    assert result.read() == data[10:20]
    assert sse_headers_seen(upstream, "GET", "q3.csv") == [None]  # OSS would answer 400 InvalidArgument


def test_v4_signed_requests_are_re_signed(app, upstream):
    auth = oss2.AuthV4(ACCESS_KEY, SECRET)
    v4 = oss2.Bucket(auth, upstream.endpoint_url, "aes-archive", region=upstream.region)
    v4.put_object("v4.txt", b"signed with V4")
    assert upstream.stored("aes-archive", "v4.txt").server_side_encryption == "AES256"
    assert v4.get_object("v4.txt").read() == b"signed with V4"


def test_multipart_gets_the_header_on_initiate_only(app, upstream):
    client = bucket(upstream, "kms-payroll")
    upstream.clear_requests()
    upload = client.init_multipart_upload("big.bin")
    parts = [os.urandom(100 * 1024 + n) for n in range(2)]
    done = [oss2.models.PartInfo(n, client.upload_part("big.bin", upload.upload_id, n, part).etag)
            for n, part in enumerate(parts, 1)]
    client.complete_multipart_upload("big.bin", upload.upload_id, done)
    assert sse_headers_seen(upstream, "POST", "big.bin")[0] == "KMS"  # initiate
    assert sse_headers_seen(upstream, "PUT", "big.bin") == [None, None]  # parts inherit
    assert sse_headers_seen(upstream, "POST", "big.bin")[1] is None  # complete
    assert upstream.stored("kms-payroll", "big.bin").server_side_encryption == "KMS"
    assert client.get_object("big.bin").read() == b"".join(parts)


def test_copy_and_append_are_encrypted_by_the_destination_rule(app, upstream):
    bucket(upstream, "open-web").put_object("public.txt", b"public")
    bucket(upstream, "aes-archive").copy_object("open-web", "public.txt", "copied.txt")
    assert upstream.stored("aes-archive", "copied.txt").server_side_encryption == "AES256"
    archive = bucket(upstream, "aes-archive")
    first = archive.append_object("log.txt", 0, b"line 1\n")
    archive.append_object("log.txt", first.next_position, b"line 2\n")
    assert upstream.stored("aes-archive", "log.txt").server_side_encryption == "AES256"
    assert archive.get_object("log.txt").read() == b"line 1\nline 2\n"


def test_passthrough_bucket_is_forwarded_unchanged(app, upstream):
    upstream.clear_requests()
    bucket(upstream, "open-web").put_object("page.html", b"<p>hi</p>")
    put = upstream.requests[-1]
    assert SSE not in {k.lower() for k, _ in put.headers}
    assert upstream.stored("open-web", "page.html").server_side_encryption is None


def test_refusals_deny_and_the_clients_own_sse_header(app, upstream):
    upstream.clear_requests()
    with pytest.raises(oss2.exceptions.AccessDenied):
        bucket(upstream, "secret-x").put_object("a", b"x")
    with pytest.raises(oss2.exceptions.ServerError) as raised:
        bucket(upstream, "aes-archive").put_object("b", b"x", headers={SSE: "SM4"})
    assert raised.value.status == 400 and "supplies the key" in raised.value.message
    assert upstream.requests == []


def test_wrong_client_signature_is_refused_before_forwarding(app, upstream):
    upstream.clear_requests()
    with pytest.raises(oss2.exceptions.ServerError) as raised:
        bucket(upstream, "kms-payroll", oss2.Auth(ACCESS_KEY, "not-the-secret")).put_object("a", b"x")
    assert (raised.value.status, raised.value.code) == (403, "SignatureDoesNotMatch")
    assert upstream.requests == []


def test_sse_c_sent_to_oss_becomes_kms_with_the_mapped_key_or_is_refused(app, upstream):
    """OSS takes no customer keys: the policy says which KMS key stands for the client's key."""
    open_web = bucket(upstream, "open-web")
    open_web.put_object("mapped.txt", b"x", headers=sse_c_headers(MAPPED_KEY))
    stored = upstream.stored("open-web", "mapped.txt")
    assert (stored.server_side_encryption, stored.kms_key_id) == ("KMS", MAPPED_KMS_KEY_ID)
    upstream.clear_requests()
    with pytest.raises(oss2.exceptions.ServerError) as raised:
        open_web.put_object("unmapped.txt", b"x", headers=sse_c_headers(os.urandom(32)))
    assert raised.value.status == 400 and "maps this key" in raised.value.message
    assert upstream.requests == []
