"""The OSS test upstream, driven directly by the real oss2 SDK (no proxy in between).

`ca` and `ca_pem` (the test CA and its PEM file) come from tests/conftest.py.
"""

import base64
import hashlib
import http.client
import os
import ssl
import time
import xml.etree.ElementTree as ET
from urllib.parse import urlsplit

import oss2
import pytest

from tests.upstreams.oss import OssUpstream, crc64ecma

ACCESS_KEY = "LTAIupstreamTest0001"
SECRET_KEY = "upstream-test-secret-0000000000"
KMS_KEY_ID = "9468da86-3509-4f8d-a61e-6eab1eac0001"
KIB = 1024
SSE = "x-oss-server-side-encryption"
SSE_KEY_ID = "x-oss-server-side-encryption-key-id"


@pytest.fixture
def upstream(ca):
    with OssUpstream(ca, {ACCESS_KEY: SECRET_KEY}) as server:
        server.create_bucket("bucket")
        yield server
    assert server.internal_errors == []


def session(ca_pem) -> oss2.Session:
    sdk_session = oss2.Session()
    # requests lets REQUESTS_CA_BUNDLE and *_PROXY from the environment override the session's
    # own settings; this client must trust the test CA and connect directly.
    sdk_session.session.trust_env = False
    sdk_session.session.verify = str(ca_pem) if ca_pem else False
    return sdk_session


def make_bucket(upstream, ca_pem, *, auth=None, name="bucket", **options) -> oss2.Bucket:
    return oss2.Bucket(auth or oss2.Auth(ACCESS_KEY, SECRET_KEY), upstream.endpoint_url, name,
                       session=session(ca_pem), **options)


@pytest.fixture
def bucket(upstream, ca_pem):
    return make_bucket(upstream, ca_pem)


def fails(operation, *args, **kwargs) -> oss2.exceptions.ServerError:
    """Call an oss2 operation that must be refused by the server; return the error."""
    with pytest.raises(oss2.exceptions.ServerError) as raised:
        operation(*args, **kwargs)
    return raised.value


def fetch(url, ca_pem, *, method="GET", headers=None, body=b"") -> tuple[int, dict, bytes]:
    parts = urlsplit(url)
    connection = http.client.HTTPSConnection(parts.hostname, parts.port,
                                             context=ssl.create_default_context(cafile=ca_pem))
    try:
        connection.request(method, parts.path + (f"?{parts.query}" if parts.query else ""),
                           body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def error_code(body: bytes) -> str:
    return ET.fromstring(body).findtext("Code")


# --- encryption at rest and the SSE header ----------------------------------------------

def test_round_trip_keeps_only_ciphertext_at_rest(bucket, upstream):
    data = b"confidential ledger line\n" * 200
    put = bucket.put_object("ledger.txt", data)  # oss2 checks the returned CRC-64 itself
    assert put.crc == crc64ecma(data)
    assert put.etag == hashlib.md5(data).hexdigest().upper()

    got = bucket.get_object("ledger.txt")
    assert got.read() == data
    assert SSE not in got.headers
    stored = upstream.stored("bucket", "ledger.txt")
    assert (stored.server_side_encryption, stored.kms_key_id, stored.size) == (None, None, len(data))
    assert b"confidential" not in stored.data_on_disk
    assert len(stored.data_on_disk) == len(data) + 12 + 16  # nonce and GCM tag


def test_stored_bytes_are_exactly_what_the_client_sent(bucket, upstream):
    data = os.urandom(1000)
    bucket.put_object("raw.bin", data, headers={SSE: "AES256"})
    assert upstream.stored_bytes("bucket", "raw.bin") == data
    assert data not in upstream.stored("bucket", "raw.bin").data_on_disk


def test_kms_with_key_id_is_recorded_and_echoed(bucket, upstream):
    put = bucket.put_object("secret", b"kms data", headers={SSE: "KMS", SSE_KEY_ID: KMS_KEY_ID})
    assert (put.headers[SSE], put.headers[SSE_KEY_ID]) == ("KMS", KMS_KEY_ID)

    stored = upstream.stored("bucket", "secret")
    assert (stored.server_side_encryption, stored.kms_key_id) == ("KMS", KMS_KEY_ID)
    assert b"kms data" not in stored.data_on_disk
    for result in (bucket.get_object("secret"), bucket.head_object("secret")):
        assert (result.headers[SSE], result.headers[SSE_KEY_ID]) == ("KMS", KMS_KEY_ID)


@pytest.mark.parametrize("algorithm", ["AES256", "SM4"])
def test_oss_managed_algorithms_are_recorded_without_a_key_id(bucket, upstream, algorithm):
    bucket.put_object("managed", b"data", headers={SSE: algorithm})
    stored = upstream.stored("bucket", "managed")
    assert (stored.server_side_encryption, stored.kms_key_id) == (algorithm, None)
    head = bucket.head_object("managed")
    assert head.headers[SSE] == algorithm and SSE_KEY_ID not in head.headers


def test_kms_without_key_id_uses_the_default_key(bucket, upstream):
    bucket.put_object("secret", b"data", headers={SSE: "KMS"})
    assert upstream.stored("bucket", "secret").kms_key_id == upstream.default_kms_key_id


@pytest.mark.parametrize("value", ["aes256", "DES", "aws:kms", ""])
def test_invalid_sse_value_is_refused(bucket, value):
    error = fails(bucket.put_object, "object", b"data", headers={SSE: value})
    assert (error.status, error.code) == (400, "InvalidEncryptionAlgorithmError")


def test_unmodelled_encryption_headers_are_refused(bucket):
    error = fails(bucket.put_object, "object", b"data",
                  headers={SSE: "KMS", "x-oss-server-side-data-encryption": "SM4"})
    assert (error.status, error.code, error.details["Header"]) == (
        400, "NotImplemented", "x-oss-server-side-data-encryption")


def test_key_id_without_kms_is_refused(bucket):
    error = fails(bucket.put_object, "object", b"data", headers={SSE: "AES256", SSE_KEY_ID: KMS_KEY_ID})
    assert (error.status, error.code) == (400, "InvalidArgument")


@pytest.mark.parametrize("operation", ["get", "head", "meta", "delete", "upload_part", "complete"])
def test_sse_header_on_other_operations_is_invalid_argument(bucket, operation):
    bucket.put_object("object", b"data", headers={SSE: "AES256"})
    upload_id = bucket.init_multipart_upload("multi", headers={SSE: "AES256"}).upload_id
    part = bucket.upload_part("multi", upload_id, 1, b"part")
    sse = {SSE: "AES256"}
    calls = {
        "get": lambda: bucket.get_object("object", headers=sse),
        "head": lambda: bucket.head_object("object", headers=sse),
        "meta": lambda: bucket.get_object_meta("object", headers=sse),
        "delete": lambda: bucket.delete_object("object", headers=sse),
        "upload_part": lambda: bucket.upload_part("multi", upload_id, 2, b"part", headers=sse),
        "complete": lambda: bucket.complete_multipart_upload(
            "multi", upload_id, [oss2.models.PartInfo(1, part.etag)], headers=sse),
    }
    error = fails(calls[operation])
    assert (error.status, error.code) == (400, "InvalidArgument")
    assert bucket.object_exists("object")  # nothing was done


# --- operations -----------------------------------------------------------------------

def test_chunked_upload_of_unknown_length(bucket, upstream):
    pieces = [b"first piece, ", b"second piece"]
    # A generator has no length: oss2 (through requests) sends Transfer-Encoding: chunked.
    bucket.put_object("streamed", (piece for piece in pieces), headers={SSE: "AES256"})
    assert upstream.requests[-1].header("Transfer-Encoding") == "chunked"
    assert bucket.get_object("streamed").read() == b"".join(pieces)
    assert upstream.stored("bucket", "streamed").server_side_encryption == "AES256"


def test_multipart_parts_inherit_the_upload_encryption(bucket, upstream):
    first, last = os.urandom(100 * KIB), b"tail of the object"
    init = bucket.init_multipart_upload("big", headers={SSE: "KMS", SSE_KEY_ID: KMS_KEY_ID})
    assert init.headers[SSE_KEY_ID] == KMS_KEY_ID
    parts = []
    for number, data in enumerate((first, last), start=1):
        result = bucket.upload_part("big", init.upload_id, number, data)
        assert (result.headers[SSE], result.headers[SSE_KEY_ID]) == ("KMS", KMS_KEY_ID)
        parts.append(oss2.models.PartInfo(number, result.etag, size=len(data), part_crc=result.crc))
    # With part CRCs given, oss2 checks the whole object's CRC-64 from the server.
    complete = bucket.complete_multipart_upload("big", init.upload_id, parts)
    assert complete.headers[SSE] == "KMS"
    assert complete.etag.endswith("-2")

    assert bucket.get_object("big").read() == first + last
    stored = upstream.stored("bucket", "big")
    assert (stored.server_side_encryption, stored.kms_key_id, stored.object_type) == ("KMS", KMS_KEY_ID, "Multipart")
    assert first[:64] not in stored.data_on_disk
    assert upstream.stored_bytes("bucket", "big") == first + last


def test_multipart_parts_below_100_kib_are_refused(bucket):
    upload_id = bucket.init_multipart_upload("big").upload_id
    parts = [oss2.models.PartInfo(number, bucket.upload_part("big", upload_id, number, b"x" * KIB).etag)
             for number in (1, 2)]
    error = fails(bucket.complete_multipart_upload, "big", upload_id, parts)
    assert (error.status, error.code) == (400, "EntityTooSmall")
    bucket.abort_multipart_upload("big", upload_id)
    assert fails(bucket.upload_part, "big", upload_id, 3, b"x").code == "NoSuchUpload"


def test_copy_is_encrypted_only_as_the_copy_request_asks(bucket, upstream):
    bucket.put_object("source", b"copied bytes", headers={SSE: "KMS", SSE_KEY_ID: KMS_KEY_ID})

    bucket.copy_object("bucket", "source", "plain-copy")
    copied = bucket.copy_object("bucket", "source", "sm4-copy", headers={SSE: "SM4"})
    assert copied.headers[SSE] == "SM4"

    assert upstream.stored("bucket", "plain-copy").server_side_encryption is None
    assert upstream.stored("bucket", "sm4-copy").server_side_encryption == "SM4"
    assert bucket.get_object("sm4-copy").read() == b"copied bytes"


def test_append_keeps_the_first_appends_encryption(bucket, upstream):
    first = bucket.append_object("log", 0, b"line one\n", headers={SSE: "AES256"}, init_crc=0)
    assert (first.next_position, first.headers[SSE]) == (9, "AES256")
    # init_crc makes oss2 check the whole object's CRC-64 after each append.
    second = bucket.append_object("log", first.next_position, b"line two\n", init_crc=first.crc)
    assert second.next_position == 18

    assert bucket.get_object("log").read() == b"line one\nline two\n"
    stored = upstream.stored("bucket", "log")
    assert (stored.object_type, stored.server_side_encryption) == ("Appendable", "AES256")
    assert b"line" not in stored.data_on_disk
    assert upstream.stored_bytes("bucket", "log") == b"line one\nline two\n"


def test_append_at_the_wrong_position_or_to_a_normal_object_conflicts(bucket):
    bucket.append_object("log", 0, b"abc")
    error = fails(bucket.append_object, "log", 1, b"d")
    assert (error.status, error.code) == (409, "PositionNotEqualToLength")
    bucket.put_object("normal", b"abc")
    error = fails(bucket.append_object, "normal", 3, b"d")
    assert (error.status, error.code) == (409, "ObjectNotAppendable")


def test_append_refuses_a_kms_key_id(bucket):
    error = fails(bucket.append_object, "log", 0, b"abc", headers={SSE: "KMS", SSE_KEY_ID: KMS_KEY_ID})
    assert (error.status, error.code) == (400, "InvalidArgument")


@pytest.mark.parametrize("byte_range, body, content_range", [
    ((2, 5), b"2345", "bytes 2-5/10"),
    ((7, None), b"789", "bytes 7-9/10"),
    ((None, 3), b"789", "bytes 7-9/10"),
])
def test_range_get(bucket, byte_range, body, content_range):
    bucket.put_object("digits", b"0123456789")
    got = bucket.get_object("digits", byte_range=byte_range)
    assert (got.status, got.read(), got.content_range) == (206, body, content_range)


@pytest.mark.parametrize("byte_range", [(5, 20), (20, 30), (None, 20)])
def test_range_outside_the_object_serves_it_whole(bucket, byte_range):
    bucket.put_object("digits", b"0123456789")
    got = bucket.get_object("digits", byte_range=byte_range)
    assert (got.status, got.read(), got.content_range) == (200, b"0123456789", None)


def test_standard_range_behaviour_clips_or_refuses(bucket):
    bucket.put_object("digits", b"0123456789")
    standard = {"x-oss-range-behavior": "standard"}
    got = bucket.get_object("digits", byte_range=(5, 20), headers=standard)
    assert (got.status, got.read(), got.content_range) == (206, b"56789", "bytes 5-9/10")
    error = fails(bucket.get_object, "digits", byte_range=(20, 30), headers=standard)
    assert (error.status, error.code) == (416, "InvalidRange")


def test_head_meta_list_and_delete(bucket):
    bucket.put_object("dir/a", b"aa", headers={"x-oss-meta-owner": "ops"})
    bucket.put_object("dir/b", b"bbb")
    bucket.put_object("top", b"t")

    head = bucket.head_object("dir/a")
    assert (head.content_length, head.headers["x-oss-meta-owner"]) == (2, "ops")
    assert bucket.get_object_meta("dir/b").content_length == 3
    assert [obj.key for obj in oss2.ObjectIterator(bucket, max_keys=1)] == ["dir/a", "dir/b", "top"]
    listed = list(oss2.ObjectIterator(bucket, delimiter="/"))
    assert [(obj.key, obj.is_prefix()) for obj in listed] == [("dir/", True), ("top", False)]

    bucket.delete_object("dir/a")
    assert fails(bucket.get_object, "dir/a").code == "NoSuchKey"
    # HEAD answers have no body: the error travels in x-oss-err, which oss2 decodes.
    assert fails(bucket.head_object, "dir/a").code == "NoSuchKey"


def test_buckets_are_created_over_http(upstream, ca_pem):
    new = make_bucket(upstream, ca_pem, name="created-over-http")
    new.create_bucket()
    new.put_object("k", b"v")
    assert new.get_object("k").read() == b"v"
    assert fails(new.create_bucket).code == "BucketAlreadyExists"


def test_virtual_hosted_addressing(bucket, upstream, ca_pem):
    bucket.put_object("hello", b"virtual")
    request = oss2.http.Request("GET", "https://unused", headers={})
    oss2.Auth(ACCESS_KEY, SECRET_KEY)._sign_request(request, "bucket", "hello")
    headers = {"Host": "bucket.oss-cn-hangzhou.aliyuncs.com", "Date": request.headers["date"],
               "Authorization": request.headers["authorization"]}
    status, _, body = fetch(upstream.endpoint_url + "/hello", ca_pem, headers=headers)
    assert (status, body) == (200, b"virtual")


def test_plain_http(ca_pem):
    with OssUpstream(None, {ACCESS_KEY: SECRET_KEY}, tls=False) as server:
        server.create_bucket("bucket")
        plain = make_bucket(server, None)
        plain.put_object("k", b"over http")
        assert plain.get_object("k").read() == b"over http"


def test_requests_are_logged(bucket, upstream):
    upstream.clear_requests()
    bucket.put_object("k", b"v", headers={SSE: "AES256"})
    assert [(request.method, request.path, request.status) for request in upstream.requests] == [
        ("PUT", "/bucket/k", 200)]
    assert upstream.requests[0].header(SSE) == "AES256"


# --- authentication -------------------------------------------------------------------

class InjectingAuth(oss2.Auth):
    """Signs like oss2, then adds a header the signature does not cover (as a broken proxy would)."""

    def __init__(self, name: str, value: str):
        super().__init__(ACCESS_KEY, SECRET_KEY)
        self._header = (name, value)

    def _sign_request(self, req, bucket_name, key):
        super()._sign_request(req, bucket_name, key)
        req.headers[self._header[0]] = self._header[1]


def test_x_oss_header_added_after_signing_breaks_the_signature(upstream, ca_pem):
    injected = make_bucket(upstream, ca_pem, auth=InjectingAuth(SSE, "AES256"))
    error = fails(injected.put_object, "object", b"data")
    assert (error.status, error.code) == (403, "SignatureDoesNotMatch")
    assert error.details["StringToSign"].startswith("PUT\n")
    assert "x-oss-server-side-encryption:AES256\n" in error.details["StringToSign"]


def test_other_headers_added_after_signing_are_not_signed_in_v1(upstream, ca_pem):
    # V1 signs only Content-MD5, Content-Type, Date and x-oss-* headers.
    injected = make_bucket(upstream, ca_pem, auth=InjectingAuth("Cache-Control", "no-cache"))
    injected.put_object("object", b"data")


@pytest.mark.parametrize("access_key, secret_key, code", [
    (ACCESS_KEY, "wrong-secret", "SignatureDoesNotMatch"),
    ("LTAIunknown", SECRET_KEY, "InvalidAccessKeyId"),
])
def test_bad_credentials_are_refused(upstream, ca_pem, access_key, secret_key, code):
    wrong = make_bucket(upstream, ca_pem, auth=oss2.Auth(access_key, secret_key))
    error = fails(wrong.get_object, "anything")
    assert (error.status, error.code) == (403, code)


def test_anonymous_requests_are_denied(upstream, ca_pem):
    anonymous = make_bucket(upstream, ca_pem, auth=oss2.AnonymousAuth())
    error = fails(anonymous.get_object, "k")
    assert (error.status, error.code) == (403, "AccessDenied")


def test_skewed_date_is_refused(bucket, monkeypatch):
    real_http_date = oss2.utils.http_date
    monkeypatch.setattr(oss2.utils, "http_date", lambda timeval=None: real_http_date(time.time() - 16 * 60))
    error = fails(bucket.get_object, "anything")
    assert (error.status, error.code) == (403, "RequestTimeTooSkewed")


def test_v4_round_trip(upstream, ca_pem):
    v4 = make_bucket(upstream, ca_pem, auth=oss2.AuthV4(ACCESS_KEY, SECRET_KEY), region="cn-hangzhou")
    v4.put_object("v4", b"signed with OSS4-HMAC-SHA256", headers={SSE: "KMS", SSE_KEY_ID: KMS_KEY_ID})
    assert v4.get_object("v4").read() == b"signed with OSS4-HMAC-SHA256"
    assert upstream.requests[-1].header("Authorization").startswith("OSS4-HMAC-SHA256 Credential=")
    assert upstream.stored("bucket", "v4").kms_key_id == KMS_KEY_ID


def test_v4_wrong_secret_or_region_is_refused(upstream, ca_pem):
    wrong_secret = make_bucket(upstream, ca_pem, auth=oss2.AuthV4(ACCESS_KEY, "wrong"), region="cn-hangzhou")
    assert fails(wrong_secret.get_object, "k").code == "SignatureDoesNotMatch"
    wrong_region = make_bucket(upstream, ca_pem, auth=oss2.AuthV4(ACCESS_KEY, SECRET_KEY), region="cn-beijing")
    error = fails(wrong_region.get_object, "k")
    assert (error.status, error.code) == (400, "InvalidArgument")


def test_v4_header_added_after_signing_breaks_the_signature(upstream, ca_pem):
    class InjectingAuthV4(oss2.AuthV4):
        def _sign_request(self, req, bucket_name, key, in_additional_headers=None):
            super()._sign_request(req, bucket_name, key, in_additional_headers)
            req.headers[SSE] = "AES256"

    injected = make_bucket(upstream, ca_pem, auth=InjectingAuthV4(ACCESS_KEY, SECRET_KEY), region="cn-hangzhou")
    error = fails(injected.put_object, "object", b"data")
    assert (error.status, error.code) == (403, "SignatureDoesNotMatch")


def test_presigned_v1_url_works_until_it_expires(bucket, upstream, ca_pem):
    bucket.put_object("shared", b"presigned body")
    status, _, body = fetch(bucket.sign_url("GET", "shared", 60), ca_pem)
    assert (status, body) == (200, b"presigned body")

    status, _, body = fetch(bucket.sign_url("GET", "shared", -1), ca_pem)
    assert (status, error_code(body)) == (403, "AccessDenied")
    tampered = bucket.sign_url("GET", "shared", 60).replace("Expires=", "Expires=1")
    status, _, body = fetch(tampered, ca_pem)
    assert (status, error_code(body)) == (403, "SignatureDoesNotMatch")


def test_error_documents_carry_the_request_id(upstream, ca_pem):
    status, headers, body = fetch(upstream.endpoint_url + "/bucket/k", ca_pem)
    root = ET.fromstring(body)
    assert (status, root.tag, root.findtext("Code")) == (403, "Error", "AccessDenied")
    assert root.findtext("RequestId") == headers["x-oss-request-id"]
    assert root.findtext("HostId") == f"127.0.0.1:{upstream.port}"


def test_unimplemented_operations_answer_400_not_implemented(bucket):
    bucket.put_object("k", b"v")
    error = fails(bucket.put_object_acl, "k", oss2.OBJECT_ACL_PUBLIC_READ)
    assert (error.status, error.code) == (400, "NotImplemented")


# --- CRC-64 ---------------------------------------------------------------------------

def test_crc64_matches_the_catalogue_and_oss2():
    assert crc64ecma(b"123456789") == 0x995DC9BBDF1939FA  # CRC-64/XZ check value
    data = os.urandom(4096)
    reference = oss2.utils.Crc64()
    reference.update(data)
    assert crc64ecma(data) == reference.crc


def test_content_md5_is_checked(bucket):
    headers = {"Content-MD5": base64.b64encode(hashlib.md5(b"other").digest()).decode()}
    error = fails(bucket.put_object, "k", b"data", headers=headers)
    assert (error.status, error.code) == (400, "InvalidDigest")
