"""The S3 test upstream, driven directly by the real boto3 client (no proxy in between).

`ca` and `ca_pem` (the test CA and its PEM file) come from tests/conftest.py.
"""

import base64
import datetime as dt
import hashlib
import hmac
import http.client
import io
import ssl
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import botocore.auth
import pytest
from botocore import UNSIGNED
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.digests import md5_b64
from tests.upstreams.s3 import (
    CHECKSUMS,
    STREAMING_SIGNED,
    STREAMING_SIGNED_TRAILER,
    STREAMING_UNSIGNED_TRAILER,
    ChunkSigner,
    S3Error,
    S3Upstream,
    decode_aws_chunked,
    sigv4_signature,
)

ACCESS_KEY = "AKIAUPSTREAMTEST0001"
SECRET_KEY = "upstream/test/secret/access/key/0000000"
KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
MIB = 1024 * 1024


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sse_c(key: bytes) -> dict:
    # boto3 base64-encodes the raw key and adds its MD5 itself.
    return {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": key}


def copy_source_sse_c(key: bytes) -> dict:
    return {"CopySourceSSECustomerAlgorithm": "AES256", "CopySourceSSECustomerKey": key}


def repeated(pattern: bytes, size: int) -> bytes:
    return (pattern * (size // len(pattern) + 1))[:size]


def fails(operation, **params) -> tuple[int, dict]:
    """Call a boto3 operation that must fail; return its HTTP status and parsed <Error>."""
    with pytest.raises(ClientError) as raised:
        operation(**params)
    response = raised.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]


def shifted_clock(monkeypatch, delta: dt.timedelta) -> None:
    """Make botocore sign as if its clock were off by `delta`."""
    real_now = botocore.auth.get_current_datetime
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *args, **kwargs: real_now() + delta)


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch, tmp_path):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CA_BUNDLE", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_REQUEST_CHECKSUM_CALCULATION",
                 "AWS_RESPONSE_CHECKSUM_VALIDATION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))


@pytest.fixture
def upstream(ca):
    with S3Upstream(ca, {ACCESS_KEY: SECRET_KEY}) as server:
        server.create_bucket("bucket")
        yield server
    assert server.internal_errors == []


def client(upstream: S3Upstream, ca_pem: Path | None, *, access_key: str = ACCESS_KEY,
           secret_key: str = SECRET_KEY, signature_version="s3v4"):
    return boto3.client(
        "s3", endpoint_url=upstream.endpoint_url, region_name="us-east-1",
        aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        verify=str(ca_pem) if ca_pem else None,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, proxies={},
                      signature_version=signature_version))


@pytest.fixture
def s3(upstream, ca_pem):
    return client(upstream, ca_pem)


class DeclaredPayloadAuth(S3SigV4Auth):
    """botocore's S3 signer, declaring a chosen x-amz-content-sha256 instead of hashing the body."""

    def __init__(self, declared: str | None):
        super().__init__(Credentials(ACCESS_KEY, SECRET_KEY), "s3", "us-east-1")
        self._declared = declared

    def payload(self, request):
        return self._declared or super().payload(request)


def send(upstream, ca_pem, method, path, *, headers=None, body=b"",
         declared_payload=None) -> tuple[int, http.client.HTTPResponse, bytes]:
    """Send one hand-made request, signed with header auth, over TLS."""
    request = AWSRequest(method=method, url=upstream.endpoint_url + path, data=body, headers=headers or {})
    DeclaredPayloadAuth(declared_payload).add_auth(request)
    return fetch(upstream.endpoint_url + path, ca_pem, method=method, headers=dict(request.headers.items()),
                 body=body)


def fetch(url, ca_pem, *, method="GET", headers=None, body=b"") -> tuple[int, http.client.HTTPResponse, bytes]:
    parts = urlsplit(url)
    connection = http.client.HTTPSConnection(parts.hostname, parts.port,
                                             context=ssl.create_default_context(cafile=ca_pem))
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response, response.read()
    finally:
        connection.close()


# --- SSE-C ----------------------------------------------------------------------------

def test_sse_c_round_trip_keeps_only_ciphertext_at_rest(s3, upstream):
    data = b"confidential ledger line\n" * 200
    put = s3.put_object(Bucket="bucket", Key="ledger", Body=data, **sse_c(KEY_A))
    assert put["SSECustomerKeyMD5"] == md5_b64(KEY_A)

    got = s3.get_object(Bucket="bucket", Key="ledger", **sse_c(KEY_A))
    assert got["Body"].read() == data
    assert (got["SSECustomerAlgorithm"], got["SSECustomerKeyMD5"]) == ("AES256", md5_b64(KEY_A))
    head = s3.head_object(Bucket="bucket", Key="ledger", **sse_c(KEY_A))
    assert (head["ContentLength"], head["SSECustomerKeyMD5"]) == (len(data), md5_b64(KEY_A))

    stored = upstream.stored("bucket", "ledger")
    assert (stored.sse_customer_key_md5, stored.size) == (md5_b64(KEY_A), len(data))
    assert b"confidential" not in stored.data_on_disk and KEY_A not in stored.data_on_disk
    nonce, ciphertext = stored.data_on_disk[:12], stored.data_on_disk[12:]
    assert AESGCM(KEY_A).decrypt(nonce, ciphertext, None) == data
    assert stored.etag != f'"{hashlib.md5(data).hexdigest()}"'


def test_plain_objects_are_encrypted_under_a_server_key(s3, upstream):
    data = b"public readme\n" * 50
    s3.put_object(Bucket="bucket", Key="readme", Body=data)

    got = s3.get_object(Bucket="bucket", Key="readme")
    assert (got["Body"].read(), got["ServerSideEncryption"]) == (data, "AES256")
    stored = upstream.stored("bucket", "readme")
    assert stored.sse_customer_key_md5 is None
    assert b"public readme" not in stored.data_on_disk
    assert stored.etag == f'"{hashlib.md5(data).hexdigest()}"'


def test_reading_an_sse_c_object_without_its_key_is_refused(s3):
    s3.put_object(Bucket="bucket", Key="ledger", Body=b"x" * 10, **sse_c(KEY_A))

    status, error = fails(s3.get_object, Bucket="bucket", Key="ledger")
    assert (status, error["Code"]) == (400, "InvalidRequest")
    assert error["Message"] == ("The object was stored using a form of Server Side Encryption. "
                                "The correct parameters must be provided to retrieve the object.")
    assert fails(s3.head_object, Bucket="bucket", Key="ledger")[0] == 400
    assert fails(s3.get_object_attributes, Bucket="bucket", Key="ledger",
                 ObjectAttributes=["ObjectSize"])[0] == 400


def test_reading_an_sse_c_object_with_another_key_is_denied(s3):
    s3.put_object(Bucket="bucket", Key="ledger", Body=b"x" * 10, **sse_c(KEY_A))

    status, error = fails(s3.get_object, Bucket="bucket", Key="ledger", **sse_c(KEY_B))
    assert (status, error["Code"], error["Message"]) == (
        403, "AccessDenied", "Requests specifying Server Side Encryption with Customer provided keys must "
                             "provide the correct secret key.")
    assert fails(s3.head_object, Bucket="bucket", Key="ledger", **sse_c(KEY_B))[0] == 403


def test_a_key_of_the_wrong_length_is_a_wrong_key_on_reads(s3):
    # S3 refuses a 16-byte key on a write as invalid, but on a read as the wrong key.
    s3.put_object(Bucket="bucket", Key="ledger", Body=b"x" * 10, **sse_c(KEY_A))

    status, error = fails(s3.get_object, Bucket="bucket", Key="ledger", **sse_c(KEY_A[:16]))
    assert (status, error["Code"]) == (403, "AccessDenied")
    assert fails(s3.head_object, Bucket="bucket", Key="ledger", **sse_c(KEY_A[:16]))[0] == 403
    status, error = fails(s3.put_object, Bucket="bucket", Key="ledger", Body=b"y", **sse_c(KEY_A[:16]))
    assert (status, error["Code"]) == (400, "InvalidArgument")


def test_customer_key_on_a_plain_object_is_refused(s3):
    s3.put_object(Bucket="bucket", Key="readme", Body=b"x")

    status, error = fails(s3.get_object, Bucket="bucket", Key="readme", **sse_c(KEY_A))
    assert (status, error["Code"], error["Message"]) == (
        400, "InvalidRequest", "The encryption parameters are not applicable to this object.")


@pytest.mark.parametrize("params, code, message", [
    ({"SSECustomerAlgorithm": "AES256", "SSECustomerKey": b64(KEY_A), "SSECustomerKeyMD5": md5_b64(KEY_B)},
     "InvalidArgument", "The calculated MD5 hash of the key did not match the hash that was provided."),
    ({"SSECustomerAlgorithm": "AES256", "SSECustomerKey": KEY_A[:16]},
     "InvalidArgument", "The secret key was invalid for the specified algorithm."),
    ({"SSECustomerAlgorithm": "AES128", "SSECustomerKey": KEY_A},
     "InvalidEncryptionAlgorithmError", "The Encryption request you specified is not valid. "
                                        "Supported value: AES256."),
], ids=["md5-mismatch", "short-key", "wrong-algorithm"])
def test_malformed_customer_keys_are_refused(s3, upstream, params, code, message):
    status, error = fails(s3.put_object, Bucket="bucket", Key="doc", Body=b"x", **params)

    assert (status, error["Code"], error["Message"]) == (400, code, message)
    # S3 names x-amz-server-side-encryption whichever SSE-C header was at fault.
    assert error["ArgumentName"] == "x-amz-server-side-encryption"
    with pytest.raises(KeyError):
        upstream.stored("bucket", "doc")


def test_customer_key_with_another_server_side_encryption_is_refused(s3, upstream):
    status, error = fails(s3.put_object, Bucket="bucket", Key="doc", Body=b"x", ServerSideEncryption="AES256",
                          **sse_c(KEY_A))

    assert (status, error["Code"], error["ArgumentName"], error["ArgumentValue"]) == (
        400, "InvalidArgument", "x-amz-server-side-encryption", "AES256")
    assert error["Message"] == ("Server Side Encryption with Customer provided key is incompatible with the "
                                "encryption method specified")


def test_plain_http_refuses_customer_keys():
    with S3Upstream(None, {ACCESS_KEY: SECRET_KEY}, tls=False) as upstream:
        upstream.create_bucket("bucket")
        s3 = client(upstream, None)
        s3.put_object(Bucket="bucket", Key="readme", Body=b"plain")

        status, error = fails(s3.put_object, Bucket="bucket", Key="doc", Body=b"x", **sse_c(KEY_A))
        assert (status, error["Code"]) == (400, "InvalidRequest")
        assert error["Message"] == ("Requests specifying Server Side Encryption with Customer provided "
                                    "keys must be made over a secure connection.")
        assert upstream.internal_errors == []


def test_bucket_blocking_sse_c_denies_sse_c_writes(s3, upstream):
    upstream.create_bucket("locked", block_sse_c=True)
    s3.put_object(Bucket="bucket", Key="source", Body=b"x", **sse_c(KEY_A))

    writes = [
        (s3.put_object, {"Key": "doc", "Body": b"x", **sse_c(KEY_A)}),
        (s3.create_multipart_upload, {"Key": "doc", **sse_c(KEY_A)}),
        (s3.copy_object, {"Key": "doc", "CopySource": {"Bucket": "bucket", "Key": "source"},
                          **copy_source_sse_c(KEY_A), **sse_c(KEY_A)}),
    ]
    for operation, params in writes:
        status, error = fails(operation, Bucket="locked", **params)
        assert (status, error["Code"]) == (403, "AccessDenied")
    s3.put_object(Bucket="locked", Key="plain", Body=b"x")


# --- authentication -------------------------------------------------------------------

def test_signed_then_injected_sse_c_headers_are_refused(s3):
    s3.put_object(Bucket="bucket", Key="ledger", Body=b"x", **sse_c(KEY_A))

    def inject_after_signing(request, **kwargs):
        request.headers["x-amz-server-side-encryption-customer-algorithm"] = "AES256"
        request.headers["x-amz-server-side-encryption-customer-key"] = b64(KEY_A)
        request.headers["x-amz-server-side-encryption-customer-key-MD5"] = md5_b64(KEY_A)

    s3.meta.events.register("before-send.s3.GetObject", inject_after_signing)
    status, error = fails(s3.get_object, Bucket="bucket", Key="ledger")
    assert (status, error["Code"]) == (403, "AccessDenied")
    assert error["Message"] == "There were headers present in the request which were not signed"
    assert error["HeadersNotSigned"] == ", ".join([
        "x-amz-server-side-encryption-customer-algorithm", "x-amz-server-side-encryption-customer-key",
        "x-amz-server-side-encryption-customer-key-md5"])


@pytest.mark.parametrize("access_key, secret_key, code", [
    (ACCESS_KEY, "not-the-secret", "SignatureDoesNotMatch"),
    ("AKIAUNKNOWNKEY000000", SECRET_KEY, "InvalidAccessKeyId"),
])
def test_bad_credentials_are_refused(upstream, ca_pem, access_key, secret_key, code):
    s3 = client(upstream, ca_pem, access_key=access_key, secret_key=secret_key)

    # A file-like body makes botocore send Expect: 100-continue, to be refused before the body.
    status, error = fails(s3.put_object, Bucket="bucket", Key="doc", Body=io.BytesIO(b"x" * 1000))
    assert (status, error["Code"]) == (403, code)
    assert upstream.requests[-1].header("Expect") == "100-continue"


def test_anonymous_requests_are_denied(upstream, ca_pem):
    status, error = fails(client(upstream, ca_pem, signature_version=UNSIGNED).list_objects_v2,
                          Bucket="bucket")
    assert (status, error["Code"]) == (403, "AccessDenied")


def test_skewed_request_time_is_refused(s3, monkeypatch):
    shifted_clock(monkeypatch, -dt.timedelta(minutes=16))

    status, error = fails(s3.list_objects_v2, Bucket="bucket")
    assert (status, error["Code"]) == (403, "RequestTimeTooSkewed")


def test_presigned_get_works_until_it_expires(s3, ca_pem, monkeypatch):
    s3.put_object(Bucket="bucket", Key="readme", Body=b"shared text")

    url = s3.generate_presigned_url("get_object", Params={"Bucket": "bucket", "Key": "readme"}, ExpiresIn=60)
    status, _, body = fetch(url, ca_pem)
    assert (status, body) == (200, b"shared text")

    shifted_clock(monkeypatch, -dt.timedelta(hours=2))
    expired = s3.generate_presigned_url("get_object", Params={"Bucket": "bucket", "Key": "readme"},
                                        ExpiresIn=60)
    status, _, body = fetch(expired, ca_pem)
    assert status == 403
    assert b"<Code>AccessDenied</Code><Message>Request has expired</Message>" in body


def test_presigned_sse_c_needs_only_the_algorithm_signed(s3, ca_pem):
    s3.put_object(Bucket="bucket", Key="ledger", Body=b"sealed text", **sse_c(KEY_A))
    key_headers = {"x-amz-server-side-encryption-customer-algorithm": "AES256",
                   "x-amz-server-side-encryption-customer-key": b64(KEY_A),
                   "x-amz-server-side-encryption-customer-key-MD5": md5_b64(KEY_A)}

    with_algorithm = s3.generate_presigned_url(
        "get_object", Params={"Bucket": "bucket", "Key": "ledger", "SSECustomerAlgorithm": "AES256"})
    assert "X-Amz-SignedHeaders=host%3Bx-amz-server-side-encryption-customer-algorithm" in with_algorithm
    status, _, body = fetch(with_algorithm, ca_pem, headers=key_headers)
    assert (status, body) == (200, b"sealed text")

    without_algorithm = s3.generate_presigned_url("get_object", Params={"Bucket": "bucket", "Key": "ledger"})
    status, _, body = fetch(without_algorithm, ca_pem, headers=key_headers)
    assert status == 403
    assert b"<HeadersNotSigned>x-amz-server-side-encryption-customer-algorithm</HeadersNotSigned>" in body


# --- payloads -------------------------------------------------------------------------

def test_boto3_puts_use_aws_chunked_with_a_crc32_trailer(s3, upstream):
    data = b"streamed body\n" * 1000
    s3.put_object(Bucket="bucket", Key="doc", Body=data)

    put = upstream.requests[-1]
    assert put.header("x-amz-content-sha256") == STREAMING_UNSIGNED_TRAILER
    assert (put.header("Content-Encoding"), put.header("x-amz-trailer")) == ("aws-chunked",
                                                                             "x-amz-checksum-crc32")
    crc32 = b64(zlib.crc32(data).to_bytes(4, "big"))
    assert upstream.stored("bucket", "doc").checksum == ("crc32", crc32)
    got = s3.get_object(Bucket="bucket", Key="doc")  # boto3 validates the returned CRC32
    assert (got["Body"].read(), got["ChecksumCRC32"]) == (data, crc32)


def unsigned_trailer_body(data: bytes, crc32: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\nx-amz-checksum-crc32:%s\r\n\r\n" % (len(data), data, b64(crc32).encode())


@pytest.mark.parametrize("decoded_length, crc32_of, status, code", [
    ("5", b"hello", 200, None),
    ("5", b"jello", 400, b"BadDigest"),
    ("6", b"hello", 400, b"IncompleteBody"),
], ids=["valid", "wrong-crc", "wrong-decoded-length"])
def test_aws_chunked_unsigned_body_is_verified(upstream, ca_pem, decoded_length, crc32_of, status, code):
    headers = {"Content-Encoding": "aws-chunked", "x-amz-decoded-content-length": decoded_length,
               "x-amz-trailer": "x-amz-checksum-crc32"}
    answered, _, body = send(upstream, ca_pem, "PUT", "/bucket/doc", headers=headers,
                             body=unsigned_trailer_body(b"hello", zlib.crc32(crc32_of).to_bytes(4, "big")),
                             declared_payload=STREAMING_UNSIGNED_TRAILER)
    assert answered == status
    if code is not None:
        assert b"<Code>%s</Code>" % code in body


def test_payload_hash_must_match_the_body(upstream, ca_pem):
    status, _, body = send(upstream, ca_pem, "PUT", "/bucket/doc", body=b"actual body",
                           declared_payload=hashlib.sha256(b"declared body").hexdigest())
    assert status == 400
    assert b"<Code>XAmzContentSHA256Mismatch</Code>" in body


def test_content_md5_must_match_the_body(s3):
    status, error = fails(s3.put_object, Bucket="bucket", Key="doc", Body=b"actual body",
                          ContentMD5=md5_b64(b"other body"))
    assert (status, error["Code"]) == (400, "BadDigest")


def chunk_signature(previous: str, timestamp: str, data: bytes) -> str:
    """Independent of the server: the chunk signature as the AWS streaming docs define it."""
    key = f"AWS4{SECRET_KEY}".encode()
    for part in (timestamp[:8], "us-east-1", "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    string_to_sign = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", timestamp,
                                f"{timestamp[:8]}/us-east-1/s3/aws4_request", previous,
                                hashlib.sha256(b"").hexdigest(), hashlib.sha256(data).hexdigest()])
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


@pytest.mark.parametrize("tampered", [False, True])
def test_signed_chunks_are_verified_end_to_end(upstream, ca_pem, tampered):
    chunks = [b"a" * 8192, b"b" * 100, b""]
    headers = {"Content-Encoding": "aws-chunked", "x-amz-decoded-content-length": str(8292)}
    request = AWSRequest(method="PUT", url=upstream.endpoint_url + "/bucket/doc", headers=headers)
    DeclaredPayloadAuth(STREAMING_SIGNED).add_auth(request)
    timestamp = request.context["timestamp"]
    signature = request.headers["Authorization"].rpartition("Signature=")[2]
    body = b""
    for chunk in chunks:
        signature = chunk_signature(signature, timestamp, chunk)
        sent = chunk.replace(b"b", b"c") if tampered else chunk
        body += b"%x;chunk-signature=%s\r\n%s\r\n" % (len(sent), signature.encode(), sent)
    request.headers["Content-Length"] = str(len(body))

    status, _, answer = fetch(upstream.endpoint_url + "/bucket/doc", ca_pem, method="PUT",
                              headers=dict(request.headers.items()), body=body)
    if tampered:
        assert status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in answer
    else:
        assert status == 200 and upstream.stored("bucket", "doc").size == 8292


# From "Signature Calculations for the Authorization Header: Transferring Payload in Multiple
# Chunks" and "...Including Trailing Headers" (AWS S3 API reference, see docs/s3.md).
AWS_EXAMPLE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
AWS_EXAMPLE_TIME = "20130524T000000Z"


def aws_example_headers(content_sha256: str, extra: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted([("content-encoding", "aws-chunked"), ("host", "s3.amazonaws.com"),
                   ("x-amz-content-sha256", content_sha256), ("x-amz-date", AWS_EXAMPLE_TIME),
                   ("x-amz-decoded-content-length", "66560"),
                   ("x-amz-storage-class", "REDUCED_REDUNDANCY"), *extra])


def aws_example_body(signatures: list[str], trailer: bytes) -> bytes:
    return (b"10000;chunk-signature=%s\r\n%s\r\n" % (signatures[0].encode(), b"a" * 65536)
            + b"400;chunk-signature=%s\r\n%s\r\n" % (signatures[1].encode(), b"a" * 1024)
            + b"0;chunk-signature=%s\r\n%s\r\n" % (signatures[2].encode(), trailer))


@pytest.mark.parametrize("mode, extra_headers, seed, signatures, trailer", [
    (STREAMING_SIGNED, [("content-length", "66824")],
     "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
     ["ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
      "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
      "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9"], b""),
    (STREAMING_SIGNED_TRAILER, [("x-amz-trailer", "x-amz-checksum-crc32c")],
     "106e2a8a18243abcf37539882f36619c00e2dfc72633413f02d3b74544bfeb8e",
     ["b474d8862b1487a5145d686f57f013e54db672cee1c953b3010fb58501ef5aa2",
      "1c1344b170168f8e65b41376b44b20fe354e373826ccbbe2c1d40a8cae51e5c7",
      "2ca2aba2005185cf7159c6277faf83795951dd77a3a99e6e65d5c9f85863f992"],
     b"x-amz-checksum-crc32c:sOO8/Q==\r\n"
     b"x-amz-trailer-signature:d81f82fc3505edab99d459891051a732e8730629a2e4a59689829ca17fe2e435\r\n"),
], ids=["chunks", "chunks-and-trailer"])
def test_aws_documented_streaming_examples(mode, extra_headers, seed, signatures, trailer):
    check = sigv4_signature("PUT", "/examplebucket/chunkObject.txt", [],
                            aws_example_headers(mode, extra_headers), secret_key=AWS_EXAMPLE_SECRET,
                            region="us-east-1", timestamp=AWS_EXAMPLE_TIME)
    assert check.signature == seed
    signer = ChunkSigner(secret_key=AWS_EXAMPLE_SECRET, region="us-east-1", timestamp=AWS_EXAMPLE_TIME,
                         seed_signature=seed)
    signed_trailer = mode == STREAMING_SIGNED_TRAILER
    body = aws_example_body(signatures, trailer)

    data, trailers = decode_aws_chunked(body, signer=signer, signed_trailer=signed_trailer)
    assert data == b"a" * 66560
    if signed_trailer:
        assert trailers == {"x-amz-checksum-crc32c": b64(CHECKSUMS["crc32c"](data))}
    for tampered in (body.replace(b"a\r\n400", b"b\r\n400"), body.replace(b"sOO8", b"sOO9")):
        if tampered != body:
            with pytest.raises(S3Error) as raised:
                decode_aws_chunked(tampered, signer=signer, signed_trailer=signed_trailer)
            assert raised.value.code == "SignatureDoesNotMatch"


@pytest.mark.parametrize("algorithm, check_value", [
    ("crc32", "cbf43926"), ("crc32c", "e3069283"), ("crc64nvme", "ae8b14860a799888"),
])
def test_checksums_match_their_catalogued_check_values(algorithm, check_value):
    assert CHECKSUMS[algorithm](b"123456789").hex() == check_value


# --- operations -----------------------------------------------------------------------

def test_multipart_upload_with_sse_c(s3, upstream):
    parts = [repeated(b"first part ", 5 * MIB), repeated(b"second part ", 5 * MIB), b"tail"]
    upload = s3.create_multipart_upload(Bucket="bucket", Key="big", **sse_c(KEY_A))
    assert upload["SSECustomerKeyMD5"] == md5_b64(KEY_A)
    upload_id = upload["UploadId"]

    etags = []
    for number, data in enumerate(parts, start=1):
        answer = s3.upload_part(Bucket="bucket", Key="big", UploadId=upload_id, PartNumber=number,
                                Body=io.BytesIO(data), **sse_c(KEY_A))
        assert answer["ETag"] != f'"{hashlib.md5(data).hexdigest()}"'
        etags.append(answer["ETag"])
    assert upstream.requests[-1].header("Expect") == "100-continue"
    for key_params, code in (({}, "InvalidRequest"), (sse_c(KEY_B), "InvalidArgument")):
        status, error = fails(s3.upload_part, Bucket="bucket", Key="big", UploadId=upload_id,
                              PartNumber=4, Body=io.BytesIO(b"x"), **key_params)
        assert (status, error["Code"]) == (400, code)
    listed = s3.list_parts(Bucket="bucket", Key="big", UploadId=upload_id)["Parts"]
    assert [part["Size"] for part in listed] == [len(data) for data in parts]

    completed = s3.complete_multipart_upload(
        Bucket="bucket", Key="big", UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, start=1)]})
    digests = b"".join(bytes.fromhex(etag.strip('"')) for etag in etags)
    assert completed["ETag"] == f'"{hashlib.md5(digests).hexdigest()}-3"'

    assert s3.get_object(Bucket="bucket", Key="big", **sse_c(KEY_A))["Body"].read() == b"".join(parts)
    stored = upstream.stored("bucket", "big")
    assert (stored.size, stored.sse_customer_key_md5) == (sum(map(len, parts)), md5_b64(KEY_A))
    assert b"first part first part" not in stored.data_on_disk
    assert fails(s3.get_object, Bucket="bucket", Key="big")[0] == 400


def test_multipart_parts_below_five_mib_are_refused(s3):
    upload_id = s3.create_multipart_upload(Bucket="bucket", Key="doc")["UploadId"]
    etags = [s3.upload_part(Bucket="bucket", Key="doc", UploadId=upload_id, PartNumber=n,
                            Body=b"small")["ETag"] for n in (1, 2)]

    status, error = fails(s3.complete_multipart_upload, Bucket="bucket", Key="doc", UploadId=upload_id,
                          MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etag}
                                                     for n, etag in enumerate(etags, start=1)]})
    assert (status, error["Code"]) == (400, "EntityTooSmall")


def test_copy_between_buckets_with_different_keys(s3, upstream):
    upstream.create_bucket("other")
    s3.put_object(Bucket="bucket", Key="source", Body=b"rotating secret", **sse_c(KEY_A))
    source = {"Bucket": "bucket", "Key": "source"}

    assert fails(s3.copy_object, Bucket="other", Key="copy", CopySource=source, **sse_c(KEY_B))[0] == 400
    assert fails(s3.copy_object, Bucket="other", Key="copy", CopySource=source,
                 **copy_source_sse_c(KEY_B), **sse_c(KEY_B))[0] == 403
    copied = s3.copy_object(Bucket="other", Key="copy", CopySource=source, **copy_source_sse_c(KEY_A),
                            **sse_c(KEY_B))
    assert copied["SSECustomerKeyMD5"] == md5_b64(KEY_B)

    assert s3.get_object(Bucket="other", Key="copy", **sse_c(KEY_B))["Body"].read() == b"rotating secret"
    assert fails(s3.get_object, Bucket="other", Key="copy", **sse_c(KEY_A))[0] == 403
    assert upstream.stored("other", "copy").sse_customer_key_md5 == md5_b64(KEY_B)


@pytest.mark.parametrize("byte_range, body, content_range", [
    ("bytes=2-5", b"2345", "bytes 2-5/10"),
    ("bytes=7-", b"789", "bytes 7-9/10"),
    ("bytes=-3", b"789", "bytes 7-9/10"),
    ("bytes=8-100", b"89", "bytes 8-9/10"),
])
def test_range_get(s3, byte_range, body, content_range):
    s3.put_object(Bucket="bucket", Key="digits", Body=b"0123456789", **sse_c(KEY_A))

    got = s3.get_object(Bucket="bucket", Key="digits", Range=byte_range, **sse_c(KEY_A))
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert (got["Body"].read(), got["ContentRange"]) == (body, content_range)


def test_range_beyond_the_object_is_not_satisfiable(s3):
    s3.put_object(Bucket="bucket", Key="digits", Body=b"0123456789")

    status, error = fails(s3.get_object, Bucket="bucket", Key="digits", Range="bytes=10-")
    assert (status, error["Code"]) == (416, "InvalidRange")


def test_conditional_get(s3):
    etag = s3.put_object(Bucket="bucket", Key="doc", Body=b"versioned")["ETag"]

    assert s3.get_object(Bucket="bucket", Key="doc", IfMatch=etag)["Body"].read() == b"versioned"
    assert fails(s3.get_object, Bucket="bucket", Key="doc", IfMatch='"0123"')[0] == 412
    assert fails(s3.get_object, Bucket="bucket", Key="doc", IfNoneMatch=etag)[0] == 304


def test_listing_and_batch_delete(s3):
    for key in ("a/1", "a/2", "b", "c d+e"):
        s3.put_object(Bucket="bucket", Key=key, Body=b"x")

    listed = s3.list_objects_v2(Bucket="bucket", Delimiter="/")
    assert [entry["Prefix"] for entry in listed["CommonPrefixes"]] == ["a/"]
    assert [entry["Key"] for entry in listed["Contents"]] == ["b", "c d+e"]
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="bucket", PaginationConfig={"PageSize": 1})
    assert [entry["Key"] for page in pages for entry in page["Contents"]] == ["a/1", "a/2", "b", "c d+e"]

    s3.delete_objects(Bucket="bucket", Delete={"Objects": [{"Key": "a/1"}, {"Key": "c d+e"}]})
    assert [entry["Key"] for entry in s3.list_objects_v2(Bucket="bucket")["Contents"]] == ["a/2", "b"]


def test_virtual_hosted_addressing(s3, upstream, ca_pem):
    s3.put_object(Bucket="bucket", Key="readme", Body=b"by host name")

    status, _, body = send(upstream, ca_pem, "GET", "/readme", headers={"Host": "bucket.s3.test"})
    assert (status, body) == (200, b"by host name")


def test_unimplemented_operations_answer_501(s3):
    status, error = fails(s3.get_bucket_tagging, Bucket="bucket")
    assert (status, error["Code"]) == (501, "NotImplemented")
