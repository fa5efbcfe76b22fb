"""keycourier.signers.oss against oss2's own signers (the reference): Auth (V1), AuthV4, Bucket.sign_url."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from unittest import mock
from urllib.parse import urlsplit

import oss2
import pytest
from oss2.api import _UrlMaker
from oss2.auth import _param_to_quoted_query

from keycourier.message import Request
from keycourier.signers.oss import (
    SignatureError,
    body_resigner,
    canonicalized_resource,
    read_signature,
    resign,
    verify,
)

ACCESS_KEY = "LTAIEXAMPLEKEY"
SECRET = "oss/secret+KEY/for=tests0123456789"
REGION = "cn-hangzhou"
BUCKET = "examplebucket"
SIGNED_AT = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
VIRTUAL_ENDPOINT = "https://oss-cn-hangzhou.aliyuncs.com"
IP_ENDPOINT = "http://127.0.0.1:9000"
KMS = {"x-oss-server-side-encryption": "KMS",
       "x-oss-server-side-encryption-key-id": "9468da86-3509-4f8d-a61e-6eab1eac0000"}

# (method, key, params, headers): the operations keycourier forwards, as oss2 sends them.
OPERATIONS = {
    "put": ("PUT", "dir/report 1.csv", {}, {
        "Content-Type": "text/csv", "Content-MD5": "1B2M2Y8AsgTpgAmY7PhCfg==",
        "x-oss-meta-owner": "team  a", "x-oss-object-acl": "private"}),
    "get": ("GET", "dir/ünïcode+x.txt", {"response-content-type": "text/plain"}, {"Range": "bytes=0-9"}),
    "head": ("HEAD", "k", {}, {}),
    "copy": ("PUT", "copy", {}, {"x-oss-copy-source": f"/{BUCKET}/dir/source",
                                 "x-oss-metadata-directive": "COPY"}),
    "initiate-multipart": ("POST", "big", {"uploads": ""}, {"Content-Type": "application/zip"}),
    "upload-part": ("PUT", "big", {"partNumber": "2", "uploadId": "0004B999EF5A239BB9138C6227D6"}, {}),
    "append": ("POST", "log", {"append": "", "position": "128"}, {"Content-Type": "text/plain"}),
    "list": ("GET", "", {"prefix": "dir/", "max-keys": "100", "delimiter": "/"}, {}),
}


@contextmanager
def frozen(at: datetime):
    """oss2 reads the clock through time.time (V1, presigned URLs) and datetime.utcnow (V4)."""
    class FrozenDatetime(datetime):
        @classmethod
        def utcnow(cls):
            return at.replace(tzinfo=None)

    with mock.patch("time.time", return_value=at.timestamp()), \
            mock.patch("oss2.auth.datetime", FrozenDatetime):
        yield


def oss2_request(method, key, params, headers, *, endpoint=VIRTUAL_ENDPOINT, bucket=BUCKET):
    return oss2.http.Request(method, _UrlMaker(endpoint, False, False)(bucket, key),
                             params=dict(params), headers=dict(headers), region=REGION, product="oss")


def as_request(method: str, url: str, headers) -> Request:
    """The request as keycourier receives it: the URL's raw target, Host, and the sent headers."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    sent = tuple((name, value) for name, value in headers.items() if value is not None)
    return Request(method, parts.scheme, parts.hostname,
                   parts.port or (443 if parts.scheme == "https" else 80), target,
                   (("Host", parts.netloc), *sent))


def sent(req: oss2.http.Request) -> Request:
    query = "&".join(_param_to_quoted_query(k, v) for k, v in req.params.items())
    return as_request(req.method, req.url + (f"?{query}" if query else ""), req.headers)


def oss2_signed(auth, operation, *, endpoint=VIRTUAL_ENDPOINT, extra_headers=(),
                additional_headers=None, at=SIGNED_AT) -> Request:
    method, key, params, headers = OPERATIONS[operation]
    req = oss2_request(method, key, params, {**headers, **dict(extra_headers)}, endpoint=endpoint)
    with frozen(at):
        if additional_headers is None:
            auth._sign_request(req, BUCKET, key)
        else:
            auth._sign_request(req, BUCKET, key, in_additional_headers=additional_headers)
    return sent(req)


def sign_url(auth, method, key, *, headers=None, params=None, expires=600, at=SIGNED_AT) -> Request:
    bucket = oss2.Bucket(auth, VIRTUAL_ENDPOINT, BUCKET, region=REGION)
    with frozen(at):
        url = bucket.sign_url(method, key, expires, headers=headers, params=params)
    return as_request(method, url, headers or {})


def checked(request: Request, secret=SECRET, now=SIGNED_AT):
    signature = read_signature(request)
    verify(request, signature, secret, now)
    return signature


def rejected(request: Request, secret=SECRET, now=SIGNED_AT) -> str:
    with pytest.raises(SignatureError) as info:
        checked(request, secret, now)
    return str(info.value)


V1 = oss2.Auth(ACCESS_KEY, SECRET)
V4 = oss2.AuthV4(ACCESS_KEY, SECRET)
AUTHS = {"v1": V1, "v4": V4}
ENDPOINTS = {"virtual-hosted": VIRTUAL_ENDPOINT, "path-style": IP_ENDPOINT}


# --- Reading ------------------------------------------------------------------------------------

def test_reads_v1_header():
    signature = read_signature(oss2_signed(V1, "put"))
    assert (signature.style, signature.access_key_id, signature.region) == ("v1-header", ACCESS_KEY, None)
    assert signature.date == "Wed, 01 May 2024 12:00:00 GMT"


def test_reads_v4_header():
    signature = read_signature(oss2_signed(V4, "get", additional_headers=["range"]))
    assert (signature.style, signature.access_key_id, signature.region, signature.date) == (
        "v4-header", ACCESS_KEY, REGION, "20240501T120000Z")
    assert signature.additional_headers == ("range",)


def test_reads_presigned_v1_and_v4():
    v1 = read_signature(sign_url(V1, "GET", "k", expires=60))
    assert (v1.style, v1.expires) == ("v1-query", int(SIGNED_AT.timestamp()) + 60)
    v4 = read_signature(sign_url(V4, "GET", "k", expires=60))
    assert (v4.style, v4.expires, v4.region) == ("v4-query", 60, REGION)


def test_anonymous_request_has_no_signature():
    assert read_signature(as_request("GET", f"{VIRTUAL_ENDPOINT}/k", {})) is None


@pytest.mark.parametrize("authorization, reason", [
    ("OSS2 AccessKeyId:ak,Signature:abc", "unsupported: signature version 2"),
    ("AWS ak:sig", "unsupported signing algorithm"),
    ("OSS ak-without-signature", "malformed Authorization header"),
    ("OSS4-HMAC-SHA256 Credential=ak/20240501/cn-hangzhou/s3/aliyun_v4_request,Signature=" + "a" * 64,
     "malformed credential"),
    ("OSS4-HMAC-SHA256 Credential=ak/20240502/cn-hangzhou/oss/aliyun_v4_request,Signature=" + "a" * 64,
     "credential date does not match request date"),
    ("OSS4-HMAC-SHA256 Credential=ak/20240501/cn-hangzhou/oss/aliyun_v4_request,AdditionalHeaders=,"
     "Signature=" + "a" * 64, "malformed AdditionalHeaders"),
    ("OSS4-HMAC-SHA256 Credential=ak/20240501/cn-hangzhou/oss/aliyun_v4_request", "needs Credential"),
])
def test_malformed_authorization_is_refused(authorization, reason):
    request = oss2_signed(V4, "head").with_headers(authorization=authorization)
    with pytest.raises(SignatureError, match=reason):
        read_signature(request)


def test_v4_needs_unsigned_payload():
    request = oss2_signed(V4, "head").with_headers(x_oss_content_sha256="ab" * 32)
    with pytest.raises(SignatureError, match="UNSIGNED-PAYLOAD"):
        read_signature(request)


def test_header_and_query_auth_together_are_refused():
    request = sign_url(V1, "GET", "k").with_headers(authorization=f"OSS {ACCESS_KEY}:{'A' * 27}=")
    with pytest.raises(SignatureError, match="only one auth mechanism"):
        read_signature(request)


# --- Verifying ----------------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", ENDPOINTS.values(), ids=ENDPOINTS.keys())
@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("version", AUTHS)
def test_accepts_what_oss2_signs(version, operation, endpoint):
    checked(oss2_signed(AUTHS[version], operation, endpoint=endpoint))


@pytest.mark.parametrize("version", AUTHS)
def test_accepts_list_buckets(version):
    req = oss2.http.Request("GET", VIRTUAL_ENDPOINT, params={"prefix": "a"}, region=REGION, product="oss")
    with frozen(SIGNED_AT):
        AUTHS[version]._sign_request(req, "", "")
    assert canonicalized_resource(sent(req)) == "/"
    checked(sent(req))


def test_path_style_addresses_bucket_in_path():
    request = oss2_signed(V1, "list", endpoint=IP_ENDPOINT)
    assert request.target.startswith(f"/{BUCKET}/?")
    assert canonicalized_resource(request) == f"/{BUCKET}/"
    assert canonicalized_resource(oss2_signed(V1, "list")) == f"/{BUCKET}/"


def test_subresources_sorted_and_decoded():
    assert canonicalized_resource(oss2_signed(V1, "upload-part")) == \
        f"/{BUCKET}/big?partNumber=2&uploadId=0004B999EF5A239BB9138C6227D6"
    assert canonicalized_resource(oss2_signed(V1, "get")) == \
        f"/{BUCKET}/dir/ünïcode+x.txt?response-content-type=text/plain"


def test_v4_additional_headers_are_verified():
    request = oss2_signed(V4, "get", additional_headers=["range"])
    checked(request)
    assert rejected(request.with_headers(range="bytes=0-99")) == "signature does not match"
    assert "missing from the request" in rejected(request.with_headers(range=None))


@pytest.mark.parametrize("tamper", [
    pytest.param(lambda r: r.with_headers(x_oss_server_side_encryption="AES256"), id="add-x-oss-header"),
    pytest.param(lambda r: r.with_headers(x_oss_meta_owner="mallory"), id="change-x-oss-header"),
    pytest.param(lambda r: r.with_headers(content_type="text/html"), id="change-content-type"),
    pytest.param(lambda r: r.with_target(r.target.replace("big", "bog")), id="change-path"),
    pytest.param(lambda r: r.with_target(r.target.replace("partNumber=2", "partNumber=3")),
                 id="change-subresource"),
    pytest.param(lambda r: r.with_target(r.target + "&acl"), id="add-subresource"),
    pytest.param(lambda r: r.with_headers(host=f"other.{urlsplit(VIRTUAL_ENDPOINT).netloc}"),
                 id="change-bucket"),
    pytest.param(lambda r: replace(r, method="DELETE"), id="change-method"),
])
@pytest.mark.parametrize("version", AUTHS)
def test_tampering_is_refused(version, tamper):
    request = oss2_signed(AUTHS[version], "upload-part", extra_headers={
        "x-oss-meta-owner": "alice", "Content-Type": "application/octet-stream"})
    checked(request)
    assert rejected(tamper(request)) == "signature does not match"


@pytest.mark.parametrize("version", AUTHS)
def test_wrong_secret_is_refused(version):
    assert rejected(oss2_signed(AUTHS[version], "put"), secret="not-the-secret") == "signature does not match"


def test_v4_signs_every_query_parameter_and_v1_only_subresources():
    tamper = lambda r: r.with_target(r.target.replace("max-keys=100", "max-keys=1000"))  # noqa: E731
    assert rejected(tamper(oss2_signed(V4, "list"))) == "signature does not match"
    checked(tamper(oss2_signed(V1, "list")))  # V1 covers no query parameter but sub-resources


@pytest.mark.parametrize("offset, ok", [(timedelta(minutes=14), True), (timedelta(minutes=16), False),
                                        (-timedelta(minutes=16), False)])
@pytest.mark.parametrize("version", AUTHS)
def test_clock_skew(version, offset, ok):
    request = oss2_signed(AUTHS[version], "head")
    if ok:
        checked(request, now=SIGNED_AT + offset)
    else:
        assert rejected(request, now=SIGNED_AT + offset) == "request time too skewed"


@pytest.mark.parametrize("version", AUTHS)
def test_presigned_url_accepted_until_expiry(version):
    request = sign_url(AUTHS[version], "GET", "dir/a b.txt", expires=300,
                       params={"response-content-disposition": "attachment"})
    checked(request, now=SIGNED_AT + timedelta(seconds=299))
    assert rejected(request, now=SIGNED_AT + timedelta(seconds=301)) == "request has expired"


@pytest.mark.parametrize("version", AUTHS)
def test_presigned_url_tampering_is_refused(version):
    request = sign_url(AUTHS[version], "PUT", "k", headers={"x-oss-meta-a": "1"})
    checked(request)
    assert rejected(request.with_headers(x_oss_meta_a="2")) == "signature does not match"
    assert rejected(request.with_target(request.target.replace("/k?", "/j?"))) == "signature does not match"


def test_presigned_v1_expires_is_signed():
    request = sign_url(V1, "GET", "k", expires=60)
    later = str(int(SIGNED_AT.timestamp()) + 3600)
    tampered = request.with_target(request.target.replace(
        f"Expires={int(SIGNED_AT.timestamp()) + 60}", f"Expires={later}"))
    assert rejected(tampered) == "signature does not match"


def test_presigned_v4_expires_bounded():
    request = sign_url(V4, "GET", "k", expires=8 * 24 * 3600)
    assert "x-oss-expires must be between" in rejected(request)


# --- Re-signing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", ENDPOINTS.values(), ids=ENDPOINTS.keys())
@pytest.mark.parametrize("operation", ["put", "copy", "initiate-multipart", "append"])
@pytest.mark.parametrize("version", AUTHS)
def test_resign_with_kms_matches_oss2(version, operation, endpoint):
    auth = AUTHS[version]
    client = oss2_signed(auth, operation, endpoint=endpoint)
    signature = checked(client)
    changed = client.with_header_map(KMS)
    resigned, new_signature = resign(changed, signature, SECRET, added_headers=KMS,
                                     now=SIGNED_AT + timedelta(minutes=1))
    # oss2 signing the final request, at the client's signing time, is the reference.
    reference = oss2_signed(auth, operation, endpoint=endpoint, extra_headers=KMS)
    assert resigned.header("authorization") == reference.header("authorization")
    assert new_signature in resigned.header("authorization")
    assert new_signature != signature.signature
    assert dict(resigned.headers) == dict(reference.headers)
    checked(resigned)


def test_resign_v4_extends_additional_headers():
    client = oss2_signed(V4, "get", additional_headers=["range"])
    signature = checked(client)
    added = {"Cache-Control": "no-cache", **KMS}
    resigned, new_signature = resign(client.with_header_map(added), signature, SECRET,
                                     added_headers=added)
    assert read_signature(resigned).additional_headers == ("cache-control", "range")
    reference = oss2_signed(V4, "get", extra_headers=added, additional_headers=["range", "cache-control"])
    assert f"Signature={new_signature}" in reference.header("authorization")
    checked(resigned)


@pytest.mark.parametrize("version", AUTHS)
def test_resign_presigned_url_matches_oss2(version):
    auth = AUTHS[version]
    client = sign_url(auth, "PUT", "dir/k", headers={"Content-Type": "text/plain"},
                      params={"x-oss-traffic-limit": "819200"} if version == "v1" else None)
    signature = checked(client)
    resigned, new_signature = resign(client.with_header_map(KMS), signature, SECRET, added_headers=KMS)
    reference = sign_url(auth, "PUT", "dir/k", headers={"Content-Type": "text/plain", **KMS},
                         params={"x-oss-traffic-limit": "819200"} if version == "v1" else None)
    assert resigned.target == reference.target
    assert new_signature != signature.signature
    checked(resigned)


def test_resign_presigned_v1_keeps_other_parameters_byte_identical():
    client = as_request("GET", f"https://{BUCKET}.oss-cn-hangzhou.aliyuncs.com/k?x=%7e&OSSAccessKeyId="
                        f"{ACCESS_KEY}&Expires=1714564860&Signature=AAAAAAAAAAAAAAAAAAAAAAAAAAA%3D&y", {})
    resigned, new_signature = resign(client, read_signature(client), SECRET, added_headers=KMS)
    before, after = client.target.split("&"), resigned.target.split("&")
    assert [p for p in after if not p.startswith("Signature=")] == \
        [p for p in before if not p.startswith("Signature=")]
    assert read_signature(resigned).signature == new_signature


def test_resign_presigned_v4_adds_additional_headers_parameter():
    client = sign_url(V4, "GET", "k")
    signature = checked(client)
    changed = client.with_headers(cache_control="no-cache")
    resigned, _ = resign(changed, signature, SECRET, added_headers=["Cache-Control"])
    assert "x-oss-additional-headers=cache-control" in resigned.target
    checked(resigned)


@pytest.mark.parametrize("version", AUTHS)
def test_no_body_resigner(version):
    signature = checked(oss2_signed(AUTHS[version], "put"))
    assert body_resigner(signature, SECRET, "seed") is None
