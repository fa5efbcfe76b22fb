"""The request pipeline on plain requests signed by botocore: no network, no proxy."""
import base64
from datetime import datetime, timezone
from unittest import mock

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from keycourier.destination import Destination, EndpointAddresses
from keycourier.keys import Secrets, blocking
from keycourier.message import Request
from keycourier.pipeline import Forward, Refuse, handle_request
from keycourier.versions import KeyVersions
from keycourier.policy import parse_policy
from tests.digests import md5_b64

ACCESS_KEY, SECRET = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
PAYROLL_KEY, ARCHIVE_KEY = bytes(range(32)), bytes(range(32, 64))
NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def policy(tmp_path):
    for name, key in (("payroll", PAYROLL_KEY), ("archive", ARCHIVE_KEY)):
        (tmp_path / f"{name}.key").write_text(base64.b64encode(key).decode())
        (tmp_path / f"{name}.key").chmod(0o600)
    (tmp_path / "app.yaml").write_text(f"access_key_id: {ACCESS_KEY}\nsecret_access_key: {SECRET}\n")
    (tmp_path / "app.yaml").chmod(0o600)
    return parse_policy("""
version: 1
endpoints:
  - {host: "127.0.0.1:9000", provider: s3}
  - {host: "plain.example:80", provider: s3}
keys:
  payroll: {file: payroll.key}
  archive: {file: archive.key}
  lost: {file: nowhere.key}
credentials:
  app: {file: app.yaml}
rules:
  - {match: {provider: s3, bucket: "payroll-*"}, action: encrypt, key: payroll}
  - {match: {provider: s3, bucket: "archive-*"}, action: encrypt, key: archive}
  - {match: {provider: s3, bucket: "lost-*"}, action: encrypt, key: lost}
  - {match: {provider: s3, bucket: "public-*"}, action: passthrough}
  - {match: {provider: s3, bucket: "secret-*"}, action: deny}
""", base_dir=tmp_path)


def signed(method, path, *, host="127.0.0.1", port=9000, scheme="https", secret=SECRET, headers=None, at=NOW):
    """A request as boto3 would send it, signed by botocore at `at`."""
    authority = host if port in (80, 443) else f"{host}:{port}"
    request = AWSRequest(method=method, url=f"{scheme}://{authority}{path}", headers=headers or {})
    request.context["client_config"] = Config(s3={"payload_signing_enabled": False})  # UNSIGNED-PAYLOAD
    with mock.patch("botocore.auth.get_current_datetime", return_value=at.replace(tzinfo=None)):
        S3SigV4Auth(Credentials(ACCESS_KEY, secret), "s3", "us-east-1").add_auth(request)
    prepared = request.prepare()
    target = prepared.url.split(authority, 1)[1]
    return Request(method, scheme, host, port, target, (("host", authority),) + tuple(
        (k, v) for k, v in prepared.headers.items() if k.lower() != "content-length"))


NO_ADDRESSES = EndpointAddresses(resolve=lambda host: [])


def run(policy, request, client_tls=True, server_name=None, address=None, versions=None):
    destination = Destination.of(request.host, request.port, server_name, address)
    secrets = Secrets()
    return blocking(lambda: handle_request(request, client_tls=client_tls, destination=destination, policy=policy,
                                           addresses=NO_ADDRESSES, secrets=secrets, versions=versions or KeyVersions(),
                                           now=NOW))


def test_put_to_an_encrypt_bucket_gets_the_key_and_is_re_signed(policy):
    sent = signed("PUT", "/payroll-eu/q3.csv")
    decision = run(policy, sent)
    assert isinstance(decision, Forward)
    out = decision.request
    assert base64.b64decode(out.header("x-amz-server-side-encryption-customer-key")) == PAYROLL_KEY
    assert out.header("x-amz-server-side-encryption-customer-key-md5") == md5_b64(PAYROLL_KEY)
    signed_headers = out.header("authorization").split("SignedHeaders=")[1].split(",")[0].split(";")
    assert {"x-amz-server-side-encryption-customer-algorithm", "x-amz-server-side-encryption-customer-key",
            "x-amz-server-side-encryption-customer-key-md5"} <= set(signed_headers)
    assert out.header("authorization") != sent.header("authorization")
    assert decision.audit.key == "payroll" and decision.audit.key_fingerprint == md5_b64(PAYROLL_KEY)
    assert set(decision.secret_headers) >= {"x-amz-server-side-encryption-customer-key"}


def test_copy_gets_the_source_buckets_key_as_copy_source_headers(policy):
    decision = run(policy, signed("PUT", "/archive-1/q3.csv", headers={"x-amz-copy-source": "/payroll-eu/q3.csv"}))
    out = decision.request
    assert base64.b64decode(out.header("x-amz-server-side-encryption-customer-key")) == ARCHIVE_KEY
    assert base64.b64decode(out.header("x-amz-copy-source-server-side-encryption-customer-key")) == PAYROLL_KEY


@pytest.mark.parametrize("method, path", [("DELETE", "/payroll-eu/q3.csv"), ("GET", "/payroll-eu?list-type=2"),
                                          ("PUT", "/public-web/index.html")])
def test_requests_that_take_no_key_go_through_untouched(policy, method, path):
    sent = signed(method, path)
    decision = run(policy, sent)
    assert isinstance(decision, Forward) and decision.request is sent and decision.body is None


def test_hosts_that_are_not_endpoints_are_not_touched(policy):
    sent = signed("PUT", "/payroll-eu/x", host="example.com", port=443)
    decision = run(policy, sent)
    assert decision.request is sent and decision.audit.outcome == "not_an_endpoint"


@pytest.mark.parametrize("path, status, reason, words", [
    ("/secret-x/a", 403, "deny", "denies access"),
    ("/unlisted/a", 403, "no_rule", "no rule in the policy covers bucket unlisted"),
    ("/lost-and-found/a", 503, "key_unavailable", "cannot get key: cannot read key 'lost' file"),
])
def test_refusals_say_why(policy, path, status, reason, words):
    decision = run(policy, signed("PUT", path))
    assert isinstance(decision, Refuse)
    assert (decision.refusal.status, decision.refusal.reason) == (status, reason)
    assert words in decision.refusal.message
    assert words.encode() in decision.body and decision.content_type == "application/xml"


def test_client_sending_its_own_sse_c_headers_to_an_encrypt_bucket_is_refused(policy):
    own = base64.b64encode(b"\x07" * 32).decode()
    decision = run(policy, signed("PUT", "/payroll-eu/a", headers={"x-amz-server-side-encryption-customer-key": own}))
    assert (decision.refusal.status, decision.refusal.reason) == (400, "client_key")


def test_key_is_never_sent_to_a_plain_http_upstream(policy):
    decision = run(policy, signed("PUT", "/payroll-eu/a", host="plain.example", port=80, scheme="http"))
    assert (decision.refusal.status, decision.refusal.reason) == (403, "tls")


def test_client_key_headers_over_plain_http_to_keycourier_are_refused(policy):
    own = base64.b64encode(b"\x07" * 32).decode()
    decision = run(policy, signed("GET", "/public-web/a", headers={"x-amz-server-side-encryption-customer-key": own}),
                   client_tls=False)
    assert (decision.refusal.status, decision.refusal.reason) == (400, "tls")


def test_wrong_client_signature_is_refused_before_any_key_leaves(policy):
    decision = run(policy, signed("PUT", "/payroll-eu/a", secret="not-the-secret"))
    assert (decision.refusal.status, decision.refusal.code) == (403, "SignatureDoesNotMatch")
    assert base64.b64encode(PAYROLL_KEY) not in decision.body


def test_unknown_access_key_id_is_refused(policy, tmp_path):
    (tmp_path / "app.yaml").write_text("access_key_id: AKIDOTHER\nsecret_access_key: x\n")
    decision = run(policy, signed("PUT", "/payroll-eu/a"))
    assert (decision.refusal.status, decision.refusal.code) == (403, "InvalidAccessKeyId")


def test_anonymous_request_cannot_be_given_a_key(policy):
    anonymous = Request("GET", "https", "127.0.0.1", 9000, "/payroll-eu/a", (("host", "127.0.0.1:9000"),))
    decision = run(policy, anonymous)
    assert (decision.refusal.status, decision.refusal.reason) == (403, "bad_signature")


def test_a_body_failing_mid_stream_is_spoiled_at_its_announced_length():
    from keycourier.pipeline import spoil_on_error

    def resigner(data):
        if b"bad" in data:
            raise ValueError("chunk signature does not match")
        return data.upper()

    forward = spoil_on_error(resigner, ValueError)
    out = [forward(b"good"), forward(b"a bad one"), forward(b"more"), forward(b"")]
    assert out == [b"GOOD", bytes(9), bytes(4), b""]


def test_copy_from_a_denied_source_is_refused(policy):
    decision = run(policy, signed("PUT", "/archive-1/x", headers={"x-amz-copy-source": "/secret-x/plans.txt"}))
    assert (decision.refusal.status, decision.refusal.reason) == (403, "deny")
    assert "bucket secret-x" in decision.refusal.message and "plans.txt" not in decision.refusal.message


@pytest.mark.parametrize("path", ["//payroll-eu/a", "/payroll-eu/a//b", "/public-web/../payroll-eu/a", "/public-web/%2e/a",
                                  "/pay%72oll-eu/a", "/public-web/a%5Cb", "/public-web/a;b", "/public-web/a%00b", "/public-web/%ff"])
def test_paths_servers_read_differently_are_refused(policy, path):
    decision = run(policy, signed("PUT", path))
    assert (decision.refusal.status, decision.refusal.reason) == (400, "unclassifiable")
    assert "payroll" not in decision.refusal.message and "public" not in decision.refusal.message  # no names in logs


def test_a_trailing_slash_names_a_folder_object(policy):
    decision = run(policy, signed("PUT", "/payroll-eu/folder/"))
    assert isinstance(decision, Forward) and decision.audit.key == "payroll"


@pytest.mark.parametrize("changes, status", [
    ({"headers": {f"x-amz-meta-h{n}": "v" for n in range(250)}}, 400),
    ({"headers": {"x-amz-meta-big": "v" * 40_000}}, 400),
    ({"path": "/public-web/" + "k" * 17_000}, 414),
])
def test_oversized_requests_are_refused_before_anything_is_re_signed(policy, changes, status):
    decision = run(policy, signed("PUT", changes.get("path", "/public-web/a"), headers=changes.get("headers")))
    assert (decision.refusal.status, decision.refusal.reason) == (status, "too_large")


@pytest.mark.parametrize("method, path, status", [
    ("PROPFIND", "/payroll-eu/a", 403), ("OPTIONS", "/payroll-eu", 403), ("BREW", "/secret-x/a", 403),
    ("PATCH", "/payroll-eu", 403),
])
def test_methods_and_operations_keycourier_cannot_name_are_refused_under_encrypt_and_deny(policy, method, path, status):
    decision = run(policy, signed(method, path))
    assert isinstance(decision, Refuse) and decision.refusal.status == status


def test_an_unknown_method_under_passthrough_is_forwarded_untouched(policy):
    sent = signed("PROPFIND", "/public-web/a")
    assert run(policy, sent).request is sent


def test_a_bulk_delete_is_judged_by_the_strictest_rule_its_objects_can_fall_under(policy, tmp_path):
    mixed = parse_policy("""
version: 1
endpoints: [{host: "127.0.0.1:9000", provider: s3}]
rules:
  - {match: {provider: s3, bucket: "shared", prefix: "hr/"}, action: deny}
  - {match: {provider: s3, bucket: "shared"}, action: passthrough}
""")
    decision = run(mixed, signed("POST", "/shared?delete"))
    assert (decision.refusal.status, decision.refusal.reason) == (403, "deny")


def test_an_endpoint_reached_under_another_name_refuses_every_request(policy):
    sent = signed("GET", "/public-web/a", host="localhost", port=9000)
    decision = run(policy, sent, address="127.0.0.1")
    assert (decision.refusal.status, decision.refusal.reason) == (400, "unclassifiable")
    decision = run(policy, signed("GET", "/public-web/a"), server_name="other.example")
    assert (decision.refusal.status, decision.refusal.reason) == (400, "unclassifiable")


@pytest.mark.parametrize("extra", [{"Upgrade": "h2c"}, {"host": "second.example"}])
def test_upgrades_and_a_second_host_header_are_refused(policy, extra):
    sent = signed("GET", "/public-web/a")
    sent = Request(sent.method, sent.scheme, sent.host, sent.port, sent.target, sent.headers + tuple(extra.items()))
    assert run(policy, sent).refusal.status == 400
