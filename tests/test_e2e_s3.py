"""End to end: the real keycourier process between real boto3 / AWS CLI clients and a strict S3 upstream,
keys and credentials from a Vault-API server through hvac. Everything on 127.0.0.1 over TLS."""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess
import sys
import time

import boto3
import pytest
import requests
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials as BotoCredentials
from botocore.exceptions import BotoCoreError, ClientError
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Keycourier
from tests.digests import md5_b64
from tests.upstreams.s3 import S3Upstream
from tests.upstreams.vault import VaultServer

ACCESS_KEY, SECRET = "AKIAKEYCOURIERTEST1", "kc/SecretAccessKey+ForTheTestsOnly0000001"
KEYS = {name: os.urandom(32) for name in ("payroll", "archive", "outage")}
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def s3(ca):
    with S3Upstream(ca, {ACCESS_KEY: SECRET}) as upstream:
        for bucket in ("payroll-eu", "archive-eu", "public-web", "outage-x", "secret-x"):
            upstream.create_bucket(bucket)
        upstream.create_bucket("payroll-new", block_sse_c=True)
        yield upstream


@pytest.fixture(scope="module")
def plain_s3(ca):
    with S3Upstream(None, {ACCESS_KEY: SECRET}, tls=False) as upstream:
        upstream.create_bucket("payroll-plain")
        upstream.create_bucket("public-plain")
        yield upstream


@pytest.fixture(scope="module")
def vault(ca, tmp_path_factory):
    with VaultServer(ca) as server:
        for name, key in KEYS.items():
            server.kv_put(f"keycourier/{name}", {"key": base64.b64encode(key).decode()})
        server.kv_put("keycourier/aws-app1", {"access_key_id": ACCESS_KEY, "secret_access_key": SECRET})
        yield server


@pytest.fixture(scope="module")
def keycourier(s3, plain_s3, vault, ca_pem, keycourier_confdir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("keycourier")
    vault.set_policy("keycourier", {"secret/data/keycourier/*": ["read"]})
    role_id, secret_id = vault.add_approle("keycourier", token_policies=["keycourier"])
    (workdir / "secret-id").write_text(secret_id)
    policy = f"""
version: 1
vault: {{addr: "{vault.addr}", ca_cert: "{ca_pem}", auth: {{method: approle, role_id: {role_id}, secret_id_file: secret-id}}}}
endpoints:
  - {{host: "127.0.0.1:{s3.port}", provider: s3}}
  - {{host: "127.0.0.1:{plain_s3.port}", provider: s3}}
keys:
  payroll: {{vault: {{path: secret/data/keycourier/payroll, field: key}}}}
  archive: {{vault: {{path: secret/data/keycourier/archive}}}}
  outage: {{vault: {{path: secret/data/keycourier/outage}}}}
credentials:
  app1: {{vault: {{path: secret/data/keycourier/aws-app1}}}}
rules:
  - {{match: {{provider: s3, bucket: "payroll-*"}}, action: encrypt, key: payroll}}
  - {{match: {{provider: s3, bucket: "archive-*"}}, action: encrypt, key: archive}}
  - {{match: {{provider: s3, bucket: "outage-*"}}, action: encrypt, key: outage}}
  - {{match: {{provider: s3, bucket: "public-*"}}, action: passthrough}}
  - {{match: {{provider: "*"}}, action: deny}}
"""
    proxy = Keycourier(workdir, keycourier_confdir, policy, upstream_ca=ca_pem)
    yield proxy
    proxy.stop()


@pytest.fixture
def app_env(keycourier, monkeypatch):
    """The legacy application's whole configuration: the proxy and the CA bundle (and its own credentials)."""
    keycourier.configure_application(monkeypatch, HTTP_PROXY=keycourier.url, http_proxy=keycourier.url,
                                     AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET,
                                     AWS_DEFAULT_REGION="us-east-1")
    return keycourier


def app_client(endpoint_url: str, **credentials):
    """boto3 as a legacy application builds it: no encryption code, no proxy code."""
    return boto3.session.Session(**credentials).client(
        "s3", endpoint_url=endpoint_url, config=Config(retries={"total_max_attempts": 1}, s3={"addressing_style": "path"}))


def direct_client(s3, ca_pem):
    """Straight to the upstream, bypassing keycourier (as an attacker with the app's credentials would)."""
    return boto3.session.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET).client(
        "s3", endpoint_url=s3.endpoint_url, region_name="us-east-1", verify=str(ca_pem),
        config=Config(retries={"total_max_attempts": 1}, proxies={}, s3={"addressing_style": "path"}))


def error_of(call) -> tuple[int, str]:
    with pytest.raises(ClientError) as raised:
        call()
    response = raised.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"]


def test_put_get_head_and_range_get_are_encrypted_with_the_vault_key(app_env, s3, ca_pem):
    client = app_client(s3.endpoint_url)
    body = os.urandom(300_000)
    client.put_object(Bucket="payroll-eu", Key="q3/report.bin", Body=body)

    stored = s3.stored("payroll-eu", "q3/report.bin")
    assert stored.sse_customer_key_md5 == md5_b64(KEYS["payroll"])
    assert stored.size == len(body) and body[:64] not in stored.data_on_disk
    assert client.get_object(Bucket="payroll-eu", Key="q3/report.bin")["Body"].read() == body
    head = client.head_object(Bucket="payroll-eu", Key="q3/report.bin")
    assert head["ContentLength"] == len(body) and head["SSECustomerKeyMD5"] == md5_b64(KEYS["payroll"])
    ranged = client.get_object(Bucket="payroll-eu", Key="q3/report.bin", Range="bytes=1000-1999")
    assert ranged["Body"].read() == body[1000:2000]

    # Without keycourier, the object cannot be read: the key never left Vault and keycourier.
    assert error_of(lambda: direct_client(s3, ca_pem).get_object(Bucket="payroll-eu", Key="q3/report.bin"))[0] == 400


def test_boto3_default_aws_chunked_upload_is_re_signed(app_env, s3):
    client = app_client(s3.endpoint_url)
    s3.clear_requests()
    client.put_object(Bucket="payroll-eu", Key="chunked.txt", Body=b"hello " * 1000)
    put = next(r for r in s3.requests if r.method == "PUT")
    headers = {k.lower(): v for k, v in put.headers}
    # Current boto3 streams PutObject as aws-chunked with a CRC trailer; the upstream accepted it re-signed.
    assert headers.get("x-amz-content-sha256") == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    assert put.status == 200
    assert client.get_object(Bucket="payroll-eu", Key="chunked.txt")["Body"].read() == b"hello " * 1000


@pytest.mark.slow
def test_multipart_upload_of_three_5_mib_parts(app_env, s3):
    client = app_client(s3.endpoint_url)
    parts = [os.urandom(5 * MiB) for _ in range(3)]
    upload = client.create_multipart_upload(Bucket="payroll-eu", Key="big.bin")
    etags = [client.upload_part(Bucket="payroll-eu", Key="big.bin", UploadId=upload["UploadId"], PartNumber=n,
                                Body=part)["ETag"] for n, part in enumerate(parts, 1)]
    client.complete_multipart_upload(Bucket="payroll-eu", Key="big.bin", UploadId=upload["UploadId"], MultipartUpload={
        "Parts": [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, 1)]})
    stored = s3.stored("payroll-eu", "big.bin")
    assert stored.size == 15 * MiB and stored.sse_customer_key_md5 == md5_b64(KEYS["payroll"])
    assert client.get_object(Bucket="payroll-eu", Key="big.bin")["Body"].read() == b"".join(parts)


def test_copy_between_encrypted_buckets_with_different_keys(app_env, s3):
    client = app_client(s3.endpoint_url)
    client.put_object(Bucket="payroll-eu", Key="to-copy.txt", Body=b"salary data")
    client.copy_object(Bucket="archive-eu", Key="copied.txt", CopySource={"Bucket": "payroll-eu", "Key": "to-copy.txt"})
    assert s3.stored("archive-eu", "copied.txt").sse_customer_key_md5 == md5_b64(KEYS["archive"])
    assert client.get_object(Bucket="archive-eu", Key="copied.txt")["Body"].read() == b"salary data"


def test_delete_and_list(app_env, s3):
    client = app_client(s3.endpoint_url)
    client.put_object(Bucket="payroll-eu", Key="listed/a.txt", Body=b"a")
    listed = client.list_objects_v2(Bucket="payroll-eu", Prefix="listed/")
    assert [o["Key"] for o in listed["Contents"]] == ["listed/a.txt"]
    client.delete_object(Bucket="payroll-eu", Key="listed/a.txt")
    assert client.list_objects_v2(Bucket="payroll-eu", Prefix="listed/").get("KeyCount") == 0


def test_unmatched_bucket_passes_through_byte_for_byte(app_env, s3):
    client = app_client(s3.endpoint_url)
    sent = []
    client.meta.events.register("before-send.s3.PutObject", lambda request, **_: sent.append(dict(request.headers)))
    s3.clear_requests()
    client.put_object(Bucket="public-web", Key="index.html", Body=b"<h1>hi</h1>")
    received = {k.lower(): v for k, v in s3.requests[-1].headers}
    client_sent = {k.lower(): (v.decode() if isinstance(v, bytes) else v) for k, v in sent[0].items()}
    assert received["authorization"] == client_sent["authorization"]  # not re-signed
    assert {k: received[k] for k in client_sent if k != "expect"} == {k: v for k, v in client_sent.items() if k != "expect"}
    assert not any(k.startswith("x-amz-server-side-encryption-customer") for k in received)
    assert s3.stored("public-web", "index.html").sse_customer_key_md5 is None


def test_deny_rule_answers_403_and_nothing_is_forwarded(app_env, s3):
    s3.clear_requests()
    status, code = error_of(lambda: app_client(s3.endpoint_url).put_object(Bucket="secret-x", Key="a", Body=b"x"))
    assert (status, code) == (403, "AccessDenied")
    assert s3.requests == []


def test_vault_down_answers_503_and_nothing_is_forwarded(app_env, s3, vault):
    s3.clear_requests()
    vault.set_down(True)
    try:
        status, code = error_of(lambda: app_client(s3.endpoint_url).put_object(Bucket="outage-x", Key="a", Body=b"x"))
    finally:
        vault.set_down(False)
    assert (status, code) == (503, "ServiceUnavailable")
    assert s3.requests == []
    app_env.wait_for_log("cannot get key: key 'outage'")


def test_wrong_client_signature_answers_403(app_env, s3):
    s3.clear_requests()
    client = app_client(s3.endpoint_url, aws_access_key_id=ACCESS_KEY, aws_secret_access_key="wrong" + SECRET)
    assert error_of(lambda: client.put_object(Bucket="payroll-eu", Key="a", Body=b"x")) == (403, "SignatureDoesNotMatch")
    assert s3.requests == []


@pytest.mark.parametrize("signature_version", [None, "s3v4"])  # None: boto3's default, SigV2 for presigned URLs
def test_presigned_get_url_made_by_boto3_works_through_the_proxy(app_env, s3, signature_version):
    app_client(s3.endpoint_url).put_object(Bucket="payroll-eu", Key="shared.txt", Body=b"presigned payload")
    presigner = boto3.session.Session().client("s3", endpoint_url=s3.endpoint_url, config=Config(
        signature_version=signature_version, s3={"addressing_style": "path"}))
    url = presigner.generate_presigned_url("get_object", Params={"Bucket": "payroll-eu", "Key": "shared.txt"}, ExpiresIn=300)
    response = fetch_through(app_env, url)
    assert response.status_code == 200, response.text
    assert response.content == b"presigned payload"


def test_presigned_url_of_an_unknown_access_key_is_refused_clearly(app_env, s3):
    presigner = boto3.session.Session(aws_access_key_id="AKIASOMEONEELSE", aws_secret_access_key="x").client(
        "s3", endpoint_url=s3.endpoint_url, config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
    url = presigner.generate_presigned_url("get_object", Params={"Bucket": "payroll-eu", "Key": "shared.txt"})
    s3.clear_requests()
    response = fetch_through(app_env, url)
    assert response.status_code == 403 and b"AKIASOMEONEELSE is not in keycourier's credentials" in response.content
    assert s3.requests == []


def fetch_through(proxy: Keycourier, url: str) -> requests.Response:
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would replace the CA given here
    return session.get(url, proxies={"https": proxy.url}, verify=str(proxy.ca_cert), timeout=10)


def test_http_upstream_under_an_encrypt_rule_is_refused(app_env, plain_s3):
    plain_s3.clear_requests()
    status, _ = error_of(lambda: app_client(plain_s3.endpoint_url).put_object(Bucket="payroll-plain", Key="a", Body=b"x"))
    assert status == 403
    assert plain_s3.requests == []


def test_client_key_headers_over_plain_http_are_refused(app_env, plain_s3):
    """The application's own SSE-C key would cross the network in the clear: keycourier stops it."""
    plain_s3.clear_requests()
    client = app_client(plain_s3.endpoint_url)
    own_key = os.urandom(32)
    assert error_of(lambda: client.put_object(Bucket="public-plain", Key="a", Body=b"x", SSECustomerAlgorithm="AES256",
                                              SSECustomerKey=own_key)) == (400, "InvalidRequest")
    assert plain_s3.requests == []


def test_bucket_blocking_sse_c_passes_the_403_and_logs_why(app_env, s3):
    status, _ = error_of(lambda: app_client(s3.endpoint_url).put_object(Bucket="payroll-new", Key="a", Body=b"x"))
    assert status == 403
    app_env.wait_for_log("the bucket must allow SSE-C")


def test_aws_cli_put_get_and_list(app_env, s3, tmp_path):
    source = tmp_path / "cli.bin"
    source.write_bytes(os.urandom(200_000))
    aws = [sys.executable, "-m", "awscli", "--endpoint-url", s3.endpoint_url]
    subprocess.run(aws + ["s3", "cp", str(source), "s3://payroll-eu/cli/cli.bin"], check=True, capture_output=True, timeout=60)
    subprocess.run(aws + ["s3", "cp", "s3://payroll-eu/cli/cli.bin", str(tmp_path / "back.bin")], check=True, capture_output=True, timeout=60)
    assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()
    assert s3.stored("payroll-eu", "cli/cli.bin").sse_customer_key_md5 == md5_b64(KEYS["payroll"])
    listing = subprocess.run(aws + ["s3", "ls", "s3://payroll-eu/cli/"], check=True, capture_output=True, text=True, timeout=60)
    assert "cli.bin" in listing.stdout


def test_no_key_or_secret_in_the_log_or_the_saved_flows(app_env, s3, vault):
    client = app_client(s3.endpoint_url)
    client.put_object(Bucket="payroll-eu", Key="leak-check.txt", Body=b"x")
    client.get_object(Bucket="payroll-eu", Key="leak-check.txt")["Body"].read()
    app_env.wait_for_log(md5_b64(KEYS["payroll"]))  # fingerprints are logged
    time.sleep(0.5)  # let the flow file catch up
    saved = app_env.flows_path.read_bytes()
    assert b"x-amz-server-side-encryption-customer-key" in saved.lower()
    assert b"[redacted by keycourier]" in saved
    for place in (app_env.log().encode(), saved):
        for key in KEYS.values():
            assert base64.b64encode(key) not in place and key not in place and key.hex().encode() not in place
        assert SECRET.encode() not in place


def test_reverse_proxy_mode_re_signs_for_the_upstream_host(s3, ca_pem, keycourier, keycourier_confdir, tmp_path, monkeypatch):
    """The application uses keycourier as its endpoint URL; only the CA bundle is configured."""
    policy = keycourier.policy_path.read_text()
    (tmp_path / "secret-id").write_text((keycourier.workdir / "secret-id").read_text())
    reverse = Keycourier(tmp_path, keycourier_confdir, policy, upstream_ca=ca_pem, mode=f"reverse:{s3.endpoint_url}")
    try:
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_CA_BUNDLE", str(reverse.ca_cert))
        client = app_client(f"https://127.0.0.1:{reverse.port}", aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET, region_name="us-east-1")
        client.put_object(Bucket="payroll-eu", Key="via-reverse.txt", Body=b"reverse")
        assert s3.stored("payroll-eu", "via-reverse.txt").sse_customer_key_md5 == md5_b64(KEYS["payroll"])
        assert client.get_object(Bucket="payroll-eu", Key="via-reverse.txt")["Body"].read() == b"reverse"
        client.put_object(Bucket="public-web", Key="via-reverse.txt", Body=b"public")
        received = {k.lower(): v for k, v in s3.requests[-1].headers}
        assert received["host"] == f"127.0.0.1:{s3.port}"
    finally:
        reverse.stop()


def test_policy_edits_take_effect_and_an_invalid_edit_keeps_the_policy(app_env, s3):
    original = app_env.policy_path.read_text()
    client = app_client(s3.endpoint_url)
    client.put_object(Bucket="public-web", Key="before.txt", Body=b"x")
    try:
        denying = original.replace('bucket: "public-*"}, action: passthrough', 'bucket: "public-*"}, action: deny')
        assert denying != original
        app_env.policy_path.write_text(denying)
        app_env.wait_for_log("in force", occurrences=2)
        assert error_of(lambda: client.put_object(Bucket="public-web", Key="after.txt", Body=b"x")) == (403, "AccessDenied")
        app_env.policy_path.write_text(original.replace("action: deny", "action: drop"))
        app_env.wait_for_log("policy reload refused, keeping the previous policy")
        assert "unknown action 'drop'" in app_env.log()
        assert metric(app_env.scrape()[1], "keycourier_policy_reloads_total", outcome="failure") == 1
        assert error_of(lambda: client.put_object(Bucket="public-web", Key="after.txt", Body=b"x")) == (403, "AccessDenied")
    finally:
        app_env.policy_path.write_text(original)
        app_env.wait_for_log("in force", occurrences=3)
    client.put_object(Bucket="public-web", Key="restored.txt", Body=b"x")


def signed_chunked_put(url: str, data: bytes, *, chunk_size: int = 64 * 1024, corrupt: bool = False):
    """A PUT with STREAMING-AWS4-HMAC-SHA256-PAYLOAD, as the AWS SDKs for Java and .NET send it."""
    pieces = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)] + [b""]
    encoded_length = sum(len(f"{len(p):x};chunk-signature=".encode()) + 64 + 2 + len(p) + 2 for p in pieces)
    request = AWSRequest(method="PUT", url=url, headers={
        "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD", "content-encoding": "aws-chunked",
        "x-amz-decoded-content-length": str(len(data)), "content-length": str(encoded_length)})
    signer = S3SigV4Auth(BotoCredentials(ACCESS_KEY, SECRET), "s3", "us-east-1")
    signer.payload = lambda _request: "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"  # botocore itself never streams signed chunks
    signer.add_auth(request)
    amz_date = request.headers["x-amz-date"]
    scope = f"{amz_date[:8]}/us-east-1/s3/aws4_request"
    key = ("AWS4" + SECRET).encode()
    for part in (amz_date[:8], "us-east-1", "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    previous = request.headers["authorization"].rsplit("Signature=", 1)[1]
    body = b""
    for piece in pieces:
        string_to_sign = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", amz_date, scope, previous,
                                    hashlib.sha256(b"").hexdigest(), hashlib.sha256(piece).hexdigest()])
        previous = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
        body += f"{len(piece):x};chunk-signature={previous}\r\n".encode() + piece + b"\r\n"
    if corrupt:
        body = body.replace(pieces[1][:16], bytes(16), 1)
    return dict(request.headers.items()), body


def test_signed_aws_chunked_upload_has_its_chunk_signatures_recomputed(app_env, s3):
    data = os.urandom(300_000)
    url = f"{s3.endpoint_url}/payroll-eu/signed-chunks.bin"
    headers, body = signed_chunked_put(url, data)
    session = requests.Session()
    session.trust_env = False
    response = session.put(url, data=body, headers=headers, proxies={"https": app_env.url},
                           verify=str(app_env.ca_cert), timeout=30)
    assert response.status_code == 200, response.text
    assert s3.stored("payroll-eu", "signed-chunks.bin").sse_customer_key_md5 == md5_b64(KEYS["payroll"])
    assert app_client(s3.endpoint_url).get_object(Bucket="payroll-eu", Key="signed-chunks.bin")["Body"].read() == data

    headers, body = signed_chunked_put(f"{s3.endpoint_url}/payroll-eu/tampered.bin", data, corrupt=True)
    response = session.put(f"{s3.endpoint_url}/payroll-eu/tampered.bin", data=body, headers=headers,
                           proxies={"https": app_env.url}, verify=str(app_env.ca_cert), timeout=30)
    assert response.status_code in (400, 403), response.text  # the upstream refused the spoiled body
    with pytest.raises(KeyError):
        s3.stored("payroll-eu", "tampered.bin")


def test_upstream_certificates_are_always_verified(s3, keycourier, keycourier_confdir, tmp_path, monkeypatch):
    """Without --upstream-ca the test upstream's CA is unknown: nothing is sent to it, keys least of all."""
    (tmp_path / "secret-id").write_text((keycourier.workdir / "secret-id").read_text())
    untrusting = Keycourier(tmp_path, keycourier_confdir, keycourier.policy_path.read_text())
    try:
        untrusting.configure_application(monkeypatch)
        s3.clear_requests()
        client = app_client(s3.endpoint_url, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET, region_name="us-east-1")
        with pytest.raises((ClientError, BotoCoreError)):  # mitmproxy drops the connection, boto3 reports it
            client.put_object(Bucket="payroll-eu", Key="unverified.txt", Body=b"x")
        assert s3.requests == []
        untrusting.wait_for_log("Certificate verify failed")
    finally:
        untrusting.stop()


def test_hosts_that_are_not_endpoints_are_tunnelled_without_interception(keycourier, vault, ca_pem):
    """The client sees the real server's certificate: keycourier does not even decrypt the traffic."""
    session = requests.Session()
    session.trust_env = False
    response = session.get(f"{vault.addr}/v1/sys/health", proxies={"https": keycourier.url}, verify=str(ca_pem), timeout=10)
    assert response.status_code == 200 and response.json()["sealed"] is False
    with pytest.raises(requests.exceptions.SSLError):  # keycourier's CA is not the one that answered
        session.get(f"{vault.addr}/v1/sys/health", proxies={"https": keycourier.url}, verify=str(keycourier.ca_cert), timeout=10)


def metric(text: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def rule_named(proxy: Keycourier, fragment: str) -> str:
    line = next(n for n, text in enumerate(proxy.policy_path.read_text().splitlines(), 1) if fragment in text)
    return f"rule{line}"


def test_metrics_move_by_exactly_the_requests_made_and_carry_no_names_or_keys(app_env, s3, vault):
    client = app_client(s3.endpoint_url)
    _, before = app_env.scrape()
    client.put_object(Bucket="payroll-eu", Key="metered/secret-plan.txt", Body=b"x" * 1000)
    client.put_object(Bucket="public-web", Key="metered/page.html", Body=b"y" * 10)
    error_of(lambda: client.put_object(Bucket="secret-x", Key="metered/a", Body=b"z"))
    vault.set_down(True)
    try:
        error_of(lambda: client.put_object(Bucket="outage-x", Key="metered/b", Body=b"z"))
        # Readiness follows Vault's last answers: it answered within the cache period, whose keys are still served.
        assert app_env.scrape("/readyz")[0] == 200
        assert metric(app_env.scrape()[1], "keycourier_vault_up") == 0
    finally:
        vault.set_down(False)
    assert app_env.scrape("/readyz") == (200, "ready\n") and app_env.scrape("/healthz") == (200, "ok\n")
    _, after = app_env.scrape()

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    put = {"provider": "s3", "operation": "PutObject"}
    assert delta("keycourier_requests_total", **put, rule=rule_named(app_env, '"payroll-*"'), action="encrypt", outcome="forwarded") == 1
    assert delta("keycourier_requests_total", **put, rule=rule_named(app_env, '"public-*"'), action="passthrough", outcome="forwarded") == 1
    assert delta("keycourier_requests_total", **put, rule=rule_named(app_env, "action: deny"), action="deny", outcome="refused") == 1
    assert delta("keycourier_requests_total", **put, rule=rule_named(app_env, '"outage-*"'), action="encrypt", outcome="refused") == 1
    assert delta("keycourier_refusals_total", reason="deny") == 1
    assert delta("keycourier_refusals_total", reason="key_unavailable") == 1
    assert delta("keycourier_keys_injected_total", provider="s3", key="payroll") == 1
    assert delta("keycourier_body_bytes_total", provider="s3", direction="upload") >= 1010
    assert delta("keycourier_upstream_seconds_count", provider="s3") == 2
    assert delta("keycourier_vault_requests_total", outcome="unreachable") >= 1
    for secret_or_name in ("payroll-eu", "public-web", "secret-plan", "metered", SECRET,
                           *(base64.b64encode(key).decode() for key in KEYS.values())):
        assert secret_or_name not in after
    for secret_or_object_name in ("secret-plan", "metered", SECRET, *(base64.b64encode(key).decode() for key in KEYS.values())):
        assert secret_or_object_name not in app_env.log()


def test_configmap_symlink_swap_is_reloaded_by_the_running_proxy(s3, ca_pem, keycourier, keycourier_confdir, tmp_path, monkeypatch):
    """Kubernetes updates a ConfigMap volume by re-pointing ..data at a new directory."""
    original = keycourier.policy_path.read_text()
    denying = original.replace('bucket: "public-*"}, action: passthrough', 'bucket: "public-*"}, action: deny')
    for version, text in (("..2026_11_23_v1", original), ("..2026_11_23_v2", denying)):
        (tmp_path / version).mkdir()
        (tmp_path / version / "policies.yaml").write_text(text)
    (tmp_path / "..data").symlink_to("..2026_11_23_v1")
    (tmp_path / "secret-id").write_text((keycourier.workdir / "secret-id").read_text())
    workdir = tmp_path / "run"
    workdir.mkdir()
    proxy = Keycourier(workdir, keycourier_confdir, original, upstream_ca=ca_pem)
    try:
        proxy.policy_path.unlink()
        proxy.policy_path.symlink_to(tmp_path / "..data" / "policies.yaml")
        (workdir / "secret-id").write_text((keycourier.workdir / "secret-id").read_text())
        proxy.configure_application(monkeypatch, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET,
                                    AWS_DEFAULT_REGION="us-east-1")
        client = app_client(s3.endpoint_url)
        client.put_object(Bucket="public-web", Key="before-swap.txt", Body=b"x")
        (tmp_path / "..data_tmp").symlink_to("..2026_11_23_v2")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        proxy.wait_for_log("in force:", occurrences=2)
        assert error_of(lambda: client.put_object(Bucket="public-web", Key="after-swap.txt", Body=b"x")) == (403, "AccessDenied")
        assert "keycourier_policy_reloads_total{outcome=\"success\"} 1.0" in proxy.scrape()[1]
    finally:
        proxy.stop()


def test_azure_cpk_headers_sent_to_s3_are_translated_into_sse_c(app_env, s3):
    """An application that speaks Azure's CPK dialect to an S3 endpoint gets SSE-C, and CPK back."""
    own_key = os.urandom(32)
    sha256 = base64.b64encode(hashlib.sha256(own_key).digest()).decode()
    client = app_client(s3.endpoint_url)

    def add_cpk(request, **_):
        request.headers["x-ms-encryption-key"] = base64.b64encode(own_key).decode()
        request.headers["x-ms-encryption-key-sha256"] = sha256
        request.headers["x-ms-encryption-algorithm"] = "AES256"

    client.meta.events.register("before-sign.s3.PutObject", add_cpk)  # botocore signs them: keycourier re-signs without
    client.meta.events.register("before-sign.s3.GetObject", add_cpk)
    written = client.put_object(Bucket="public-web", Key="translated.txt", Body=b"in another dialect")
    assert s3.stored("public-web", "translated.txt").sse_customer_key_md5 == md5_b64(own_key)
    assert written["ResponseMetadata"]["HTTPHeaders"]["x-ms-encryption-key-sha256"] == sha256
    assert written["ResponseMetadata"]["HTTPHeaders"]["x-ms-request-server-encrypted"] == "true"
    read = client.get_object(Bucket="public-web", Key="translated.txt")
    assert read["Body"].read() == b"in another dialect"
    assert read["ResponseMetadata"]["HTTPHeaders"]["x-ms-server-encrypted"] == "true"
    assert "x-amz-server-side-encryption-customer-key-md5" not in read["ResponseMetadata"]["HTTPHeaders"]


@pytest.mark.slow
def test_a_large_refused_upload_is_answered_and_the_connection_stays_usable(app_env, s3):
    """The refused body is streamed away (proxy.sink), not held; nothing reaches the upstream."""
    client = app_client(s3.endpoint_url)
    s3.clear_requests()
    assert error_of(lambda: client.put_object(Bucket="secret-x", Key="big.bin", Body=os.urandom(32 * MiB))) == (403, "AccessDenied")
    assert s3.requests == []
    client.put_object(Bucket="public-web", Key="after-refusal.txt", Body=b"still fine")
    assert s3.stored("public-web", "after-refusal.txt").size == 10
