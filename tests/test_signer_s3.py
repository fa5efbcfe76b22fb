"""keycourier.signers.s3 against botocore (the reference signer) and against AWS's documented examples."""
from __future__ import annotations

import base64
import hashlib
import hmac
import io
import random
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from email.utils import formatdate, parsedate_to_datetime
from unittest import mock
from urllib.parse import quote, urlsplit

import boto3
import botocore.session
import pytest
from botocore.auth import HmacV1Auth, S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from keycourier.message import Request
from keycourier.signers.s3 import (
    V2_SUBRESOURCES,
    V2_UNSIGNED_SUBRESOURCES,
    AwsChunkedResigner,
    SignatureError,
    SigV2Signature,
    body_resigner,
    canonical_headers,
    canonical_query_string,
    canonical_uri,
    canonicalized_amz_headers,
    canonicalized_resource,
    read_signature,
    resign,
    verify,
)

ACCESS_KEY = "AKIDEXAMPLE"
SECRET = "kc/secret+KEY/for=tests0123456789abcdefg"
REGION = "eu-west-1"
SIGNED_AT = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
SSE_C = {
    "x-amz-server-side-encryption-customer-algorithm": "AES256",
    "x-amz-server-side-encryption-customer-key": base64.b64encode(bytes(range(32))).decode(),
    "x-amz-server-side-encryption-customer-key-MD5":
        base64.b64encode(hashlib.md5(bytes(range(32))).digest()).decode(),
}

# AWS documentation examples (sig-v4-header-based-auth, sigv4-query-string-auth, sigv4-streaming,
# sigv4-streaming-trailers): see docs/sigv4.md.
DOC_KEY = "AKIAIOSFODNN7EXAMPLE"
DOC_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
DOC_TIME = datetime(2013, 5, 24, 0, 0, 30, tzinfo=timezone.utc)
DOC_SCOPE = "20130524/us-east-1/s3/aws4_request"
DOC_DATA = b"a" * 66560
CHUNK_SEED = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
CHUNK_SIGNATURES = (
    "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
    "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
    "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
)
TRAILER_SEED = "106e2a8a18243abcf37539882f36619c00e2dfc72633413f02d3b74544bfeb8e"
TRAILER_CHUNK_SIGNATURES = (
    "b474d8862b1487a5145d686f57f013e54db672cee1c953b3010fb58501ef5aa2",
    "1c1344b170168f8e65b41376b44b20fe354e373826ccbbe2c1d40a8cae51e5c7",
    "2ca2aba2005185cf7159c6277faf83795951dd77a3a99e6e65d5c9f85863f992",
)
TRAILER = b"x-amz-checksum-crc32c:sOO8/Q=="
TRAILER_SIGNATURE = "d81f82fc3505edab99d459891051a732e8730629a2e4a59689829ca17fe2e435"


# --- building requests with botocore ------------------------------------------------------------

@contextmanager
def botocore_clock(at: datetime = SIGNED_AT):
    # SigV4 signers read get_current_datetime; SigV2 ones time.time (Expires, and Date via formatdate).
    with mock.patch("botocore.auth.get_current_datetime", return_value=at.replace(tzinfo=None)), \
            mock.patch("time.time", return_value=at.timestamp()):
        yield


def as_request(prepared) -> Request:
    """A botocore prepared request as keycourier sees it on the wire (Host added as urllib3 does)."""
    url = urlsplit(prepared.url)
    headers = [(name, value.decode() if isinstance(value, bytes) else value)
               for name, value in prepared.headers.items()]
    if not any(name.lower() == "host" for name, _ in headers):
        headers.insert(0, ("Host", url.netloc))
    port = url.port or (443 if url.scheme == "https" else 80)
    target = url.path + (f"?{url.query}" if url.query else "")
    return Request(prepared.method, url.scheme, url.hostname, port, target, tuple(headers))


def header_signed(method: str, url: str, headers: dict | None = None, body: bytes = b"", *,
                  unsigned_payload: bool = False, at: datetime = SIGNED_AT) -> Request:
    aws = AWSRequest(method=method, url=url, headers=dict(headers or {}), data=body)
    if unsigned_payload:
        aws.context["client_config"] = Config(s3={"payload_signing_enabled": False})
    with botocore_clock(at):
        S3SigV4Auth(Credentials(ACCESS_KEY, SECRET), "s3", REGION).add_auth(aws)
    return as_request(aws.prepare())


def presigned(method: str, url: str, headers: dict | None = None, *, expires: int = 3600) -> Request:
    aws = AWSRequest(method=method, url=url, headers=dict(headers or {}))
    with botocore_clock():
        S3SigV4QueryAuth(Credentials(ACCESS_KEY, SECRET), "s3", REGION, expires=expires).add_auth(aws)
    return as_request(aws.prepare())


def object_url(key: str, query: str = "", host: str = "http://127.0.0.1:9000") -> str:
    # Keys are quoted the way botocore quotes them for the request path.
    return f"{host}/bucket/{quote(key, safe='/~')}" + (f"?{query}" if query else "")


def boto3_client(endpoint: str | None = "http://127.0.0.1:9000", **config):
    """A boto3 client with the test credentials; `config` overrides SigV4 and path-style addressing
    (None: boto3's default)."""
    config = {"signature_version": "s3v4", "s3": {"addressing_style": "path"}, **config}
    return boto3.client(
        "s3", region_name=REGION, endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET,
        config=Config(retries={"max_attempts": 0}, **config),
    )


class _Sent(Exception):
    pass


def boto3_sent(call, endpoint: str | None = "http://127.0.0.1:9000", **config) -> Request:
    """The request a real boto3 client call sends (captured before it reaches the network)."""
    client = boto3_client(endpoint, **config)
    sent = []

    def capture(request, **_):
        sent.append(request)
        raise _Sent

    client.meta.events.register("before-send.s3.*", capture)
    with botocore_clock(), pytest.raises(_Sent):
        call(client)
    return as_request(sent[0])


def bare(target: str = "/bucket/k", *headers: tuple[str, str]) -> Request:
    return Request("GET", "http", "127.0.0.1", 9000, target, (("Host", "127.0.0.1:9000"), *headers))


def verified(request: Request, now: datetime = SIGNED_AT, secret: str = SECRET):
    signature = read_signature(request)
    assert signature is not None
    verify(request, signature, secret, now)
    return signature


def rejected(request: Request, now: datetime = SIGNED_AT, secret: str = SECRET) -> str:
    with pytest.raises(SignatureError) as error:
        verify(request, read_signature(request), secret, now)
    assert SECRET not in str(error.value)
    return str(error.value)


def upstream(request: Request, headers: dict, host: str = "s3.eu-west-1.amazonaws.com") -> Request:
    """`request` as forwarded: SSE-C headers injected, sent to the real endpoint."""
    return replace(request, scheme="https", host=host, port=443).with_header_map({**headers, "Host": host})


# --- header auth --------------------------------------------------------------------------------

KEYS = ["plain.txt", "with space/and+plus=equals~tilde.txt", "dír/ünï cødé €.txt",
        "a//double/./dot/../k"]
QUERIES = ["", "uploads", "partNumber=2&uploadId=x", "list-type=2&prefix=a%2Fb",
           "prefix=a%2Bb%20c&delimiter=%2F&encoding-type=url"]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("query", QUERIES)
@pytest.mark.parametrize("unsigned_payload", [False, True])
def test_botocore_header_signatures_verify(key, query, unsigned_payload):
    request = header_signed("PUT", object_url(key, query), {"x-amz-meta-colour": "  dark   red "},
                            b"payload", unsigned_payload=unsigned_payload)
    signature = verified(request)
    assert signature.style == "header"
    assert (signature.access_key_id, signature.region, signature.service) == (ACCESS_KEY, REGION, "s3")
    assert signature.payload_hash == ("UNSIGNED-PAYLOAD" if unsigned_payload
                                      else hashlib.sha256(b"payload").hexdigest())
    assert "x-amz-meta-colour" in signature.signed_headers


@pytest.mark.parametrize("call", [
    lambda c: c.put_object(Bucket="bucket", Key="a b/ü+=~.txt", Body=b"hello"),
    lambda c: c.get_object(Bucket="bucket", Key="k", Range="bytes=0-9"),
    lambda c: c.list_objects_v2(Bucket="bucket", Prefix="a/b c"),
    lambda c: c.create_multipart_upload(Bucket="bucket", Key="big", Metadata={"m": "v"}),
    lambda c: c.upload_part(Bucket="bucket", Key="big", PartNumber=2, UploadId="x~y", Body=b"p"),
], ids=["put", "get-range", "list-v2", "create-multipart", "upload-part"])
def test_real_boto3_requests_verify(call):
    verified(boto3_sent(call))


def test_real_boto3_aws_chunked_upload_needs_no_body_change():
    # Over https botocore streams file bodies as aws-chunked with an unsigned checksum trailer.
    request = boto3_sent(lambda c: c.put_object(Bucket="bucket", Key="k", Body=io.BytesIO(b"hello")),
                         "https://s3.example.test")
    signature = verified(request)
    assert signature.payload_hash == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    assert body_resigner(signature, SECRET, "0" * 64) is None


def test_aws_documented_get_object_example_verifies():
    request = Request("GET", "https", "examplebucket.s3.amazonaws.com", 443, "/test.txt", (
        ("Host", "examplebucket.s3.amazonaws.com"),
        ("Range", "bytes=0-9"),
        ("x-amz-content-sha256", hashlib.sha256(b"").hexdigest()),
        ("x-amz-date", "20130524T000000Z"),
        ("Authorization", f"AWS4-HMAC-SHA256 Credential={DOC_KEY}/{DOC_SCOPE},"
                          "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"
                          "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"),
    ))
    verified(request, DOC_TIME, DOC_SECRET)


def test_date_header_instead_of_x_amz_date():
    request = header_signed("GET", object_url("k"), {"Date": "anything, botocore rewrites it"})
    assert request.header("x-amz-date") is None
    assert verified(request).amz_date == "20240501T120000Z"


def test_host_from_authority_when_no_host_header():
    request = header_signed("GET", object_url("k"))
    verified(replace(request, headers=tuple(h for h in request.headers if h[0].lower() != "host")))


BASE = ("PUT", object_url("dir/key.txt", "tagging"), {"x-amz-meta-colour": "red"}, b"body")


@pytest.mark.parametrize("tamper", [
    lambda r: r.with_header_map({"x-amz-meta-colour": "blue"}),
    lambda r: r.with_target(r.target.replace("key.txt", "other.txt")),
    lambda r: r.with_target(r.target + "&versionId=1"),
    lambda r: replace(r, method="POST"),
    lambda r: r.with_header_map({"Host": "evil.example"}),
    lambda r: r.with_header_map({"x-amz-date": "20240501T120100Z"}),
    lambda r: r.with_header_map({"x-amz-content-sha256": hashlib.sha256(b"other").hexdigest()}),
], ids=["header", "path", "query", "method", "host", "date", "payload-hash"])
def test_tampered_request_is_rejected(tamper):
    request = header_signed(*BASE)
    verified(request)
    assert rejected(tamper(request)) == "signature does not match"


def test_wrong_secret_is_rejected():
    assert rejected(header_signed(*BASE), secret=SECRET + "x") == "signature does not match"


@pytest.mark.parametrize("offset,ok", [(14, True), (-14, True), (16, False), (-16, False)])
def test_header_auth_clock_skew(offset, ok):
    request = header_signed(*BASE)
    now = SIGNED_AT + timedelta(minutes=offset)
    if ok:
        verified(request, now)
    else:
        assert rejected(request, now) == "request time too skewed"


def test_unsigned_amz_header_is_rejected_by_name():
    request = header_signed(*BASE).with_header_map({"x-amz-acl": "public-read", "x-amz-tagging": "a=b"})
    assert rejected(request) == "headers present in the request were not signed: x-amz-acl, x-amz-tagging"


def test_unsigned_non_amz_headers_are_allowed():
    verified(header_signed(*BASE).with_header_map({"User-Agent": "x", "x-amzn-trace-id": "t"}))


# --- canonicalisation rules botocore cannot referee (it signs the raw URL) -----------------------

@pytest.mark.parametrize("path,canonical", [
    ("", "/"),
    ("/bucket/a%20b/%C3%BC%2B%3D~.txt", "/bucket/a%20b/%C3%BC%2B%3D~.txt"),  # as SDKs send: unchanged
    ("/bucket/a//b/./../c", "/bucket/a//b/./../c"),  # S3: no normalisation
    ("/bucket/k=v@x(1)+", "/bucket/k%3Dv%40x%281%29%2B"),  # reserved characters sent raw
    ("/bucket/%c3%bc%2f", "/bucket/%C3%BC%2F"),  # lowercase escapes; %2F stays inside its segment
])
def test_canonical_uri(path, canonical):
    assert canonical_uri(path) == canonical


def test_canonical_query_string():
    raw = "prefix=a+b%2Bc&uploads&b=2&a=1&a=0&X-Amz-Signature=f00&empty=&&%7e=%7E"
    assert canonical_query_string(raw, excluded=["X-Amz-Signature"]) == \
        "a=0&a=1&b=2&empty=&prefix=a%20b%2Bc&uploads=&~=~"


def test_canonical_headers_trim_and_join_repeats():
    request = bare("/", ("X-Amz-Meta-A", "  1  "), ("x-amz-meta-a", "2   3"), ("Range", "bytes=0-9"))
    assert canonical_headers(request, ["host", "x-amz-meta-a"]) == "host:127.0.0.1:9000\nx-amz-meta-a:1,2 3\n"
    with pytest.raises(SignatureError, match="signed header missing from the request: range2"):
        canonical_headers(request, ["range2"])


# --- resigning ----------------------------------------------------------------------------------

@pytest.mark.parametrize("key,query", [("k", ""), ("with space/ü+=~.txt", "partNumber=2&uploadId=x")])
@pytest.mark.parametrize("unsigned_payload", [False, True])
def test_resign_equals_botocore_signing_the_final_request(key, query, unsigned_payload):
    headers = {"x-amz-meta-colour": "red", "Content-Type": "text/plain"}
    client = header_signed("PUT", object_url(key, query), headers, b"body",
                           unsigned_payload=unsigned_payload)
    signature = verified(client)

    forwarded, new_signature = resign(upstream(client, SSE_C), signature, SECRET, added_headers=SSE_C)

    reference = header_signed("PUT", object_url(key, query, "https://s3.eu-west-1.amazonaws.com"),
                              {**headers, **SSE_C}, b"body", unsigned_payload=unsigned_payload)
    assert forwarded.header("authorization") == reference.header("authorization")
    assert forwarded.header("authorization").endswith(f"Signature={new_signature}")
    verified(forwarded)


def test_resign_with_nothing_added_reproduces_the_client_signature():
    client = header_signed(*BASE)
    forwarded, new_signature = resign(client, verified(client), SECRET, added_headers=[])
    assert new_signature == read_signature(client).signature
    assert forwarded.header("authorization") == client.header("authorization")


def test_resign_sorts_and_deduplicates_signed_headers():
    client = header_signed(*BASE)
    forwarded, _ = resign(client.with_header_map(SSE_C), verified(client), SECRET,
                          added_headers=["X-Amz-Meta-Colour", *SSE_C, *SSE_C])
    names = read_signature(forwarded).signed_headers
    assert list(names) == sorted(set(names))
    assert set(names) == set(read_signature(client).signed_headers) | {h.lower() for h in SSE_C}


# --- query auth (presigned URLs) ----------------------------------------------------------------

@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("query", QUERIES)
def test_botocore_presigned_urls_verify(key, query):
    request = presigned("GET", object_url(key, query))
    signature = verified(request, SIGNED_AT + timedelta(minutes=30))
    assert (signature.style, signature.expires, signature.payload_hash) == ("query", 3600, "UNSIGNED-PAYLOAD")


def test_real_boto3_presigned_urls_verify_and_resign():
    client = boto3_client()
    with botocore_clock():
        url = client.generate_presigned_url("get_object", Params={
            "Bucket": "bucket", "Key": "dir/my file+€=~.txt",
            "ResponseContentDisposition": 'attachment; filename="a b.txt"'}, ExpiresIn=900)
    request = as_request(AWSRequest(method="GET", url=url).prepare())
    signature = verified(request, SIGNED_AT + timedelta(minutes=10))
    assert rejected(request.with_target(request.target.replace("dir", "dir2"))) == "signature does not match"

    forwarded, _ = resign(upstream(request, SSE_C), signature, SECRET, added_headers=SSE_C)
    verified(forwarded)


def test_aws_documented_presigned_url_verifies():
    target = ("/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
              "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
              "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
              "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")
    request = Request("GET", "https", "examplebucket.s3.amazonaws.com", 443, target,
                      (("Host", "examplebucket.s3.amazonaws.com"),))
    verified(request, DOC_TIME, DOC_SECRET)


def test_presigned_resign_equals_botocore_and_keeps_other_parameters():
    url = object_url("dir/ü k.txt", "response-content-type=text%2Fplain&versionId=v+1")
    client = presigned("GET", url)
    signature = verified(client)

    forwarded, new_signature = resign(upstream(client, SSE_C), signature, SECRET, added_headers=SSE_C)

    reference = presigned("GET", url.replace("http://127.0.0.1:9000", "https://s3.eu-west-1.amazonaws.com"),
                          SSE_C)
    assert forwarded.target == reference.target
    assert forwarded.target.endswith(f"&X-Amz-Signature={new_signature}")
    old_parameters = [p for p in client.raw_query.split("&") if not p.startswith(("X-Amz-Signature=",
                                                                                  "X-Amz-SignedHeaders="))]
    assert [p for p in forwarded.raw_query.split("&") if p in old_parameters] == old_parameters
    verified(forwarded)


def test_presigned_expiry():
    request = presigned("GET", object_url("k"), expires=60)
    verified(request, SIGNED_AT + timedelta(seconds=60))
    assert rejected(request, SIGNED_AT + timedelta(seconds=61)) == "request has expired"
    assert rejected(request, SIGNED_AT - timedelta(minutes=16)) == "request is not yet valid"


@pytest.mark.parametrize("expires", [0, 604801])
def test_presigned_expires_out_of_range(expires):
    assert "X-Amz-Expires must be between 1 and 604800" in rejected(presigned("GET", object_url("k"),
                                                                               expires=expires))


def test_presigned_unsigned_amz_header_is_rejected():
    request = presigned("PUT", object_url("k")).with_header_map({"x-amz-acl": "public-read"})
    assert rejected(request) == "headers present in the request were not signed: x-amz-acl"


def test_presigned_declared_payload_hash_is_signed():
    digest = hashlib.sha256(b"body").hexdigest()
    request = presigned("PUT", object_url("k"), {"X-Amz-Content-SHA256": digest})
    assert verified(request).payload_hash == digest
    assert rejected(request.with_header_map({"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"})) \
        == "signature does not match"


# --- reading the signature ----------------------------------------------------------------------

def test_anonymous_request_has_no_signature():
    assert read_signature(bare("/bucket/k?list-type=2")) is None


@pytest.mark.parametrize("request_", [
    bare("/bucket/k", ("Authorization", "AWS4-ECDSA-P256-SHA256 Credential=a/20240501/s3/aws4_request, "
                                        "SignedHeaders=host, Signature=00")),
    bare("/bucket/k?X-Amz-Algorithm=AWS4-ECDSA-P256-SHA256"),
], ids=["sigv4a-header", "sigv4a-query"])
def test_unsupported_signature_versions(request_):
    with pytest.raises(SignatureError, match="^unsupported"):
        read_signature(request_)


def test_malformed_authorization_headers():
    good = header_signed(*BASE)
    authorization = good.header("authorization")
    for broken in [
        authorization.replace("Credential=", "Cred="),
        authorization.rsplit(", Signature=", 1)[0],
        authorization.replace("/aws4_request", "/aws5_request"),
        authorization.replace("SignedHeaders=host", "SignedHeaders=Host"),
        authorization[:-1],
    ]:
        with pytest.raises(SignatureError):
            read_signature(good.with_header_map({"Authorization": broken}))
    with pytest.raises(SignatureError, match="x-amz-content-sha256"):
        read_signature(good.with_header_map({"X-Amz-Content-SHA256": None}))


def test_header_and_query_auth_together_are_refused():
    request = presigned("GET", object_url("k")).with_header_map({"Authorization": "AWS4-HMAC-SHA256 x"})
    with pytest.raises(SignatureError, match="only one auth mechanism"):
        read_signature(request)


@pytest.mark.parametrize("expires", ["abc", "%C2%B2", "1" * 13])
def test_malformed_x_amz_expires(expires):
    request = presigned("GET", object_url("k"))
    with pytest.raises(SignatureError, match="^malformed X-Amz-Expires$"):
        read_signature(request.with_target(
            request.target.replace("X-Amz-Expires=3600", f"X-Amz-Expires={expires}")))


def test_presigned_url_missing_a_parameter():
    request = presigned("GET", object_url("k"))
    target = "&".join(p for p in request.target.split("&") if not p.startswith("X-Amz-Date="))
    with pytest.raises(SignatureError, match="X-Amz-Date"):
        read_signature(request.with_target(target))


def test_credential_date_must_match_request_date():
    request = header_signed(*BASE)
    assert rejected(request.with_header_map({"x-amz-date": "20240502T120000Z"}),
                    SIGNED_AT + timedelta(days=1)) == "credential date does not match request date"


# --- aws-chunked bodies -------------------------------------------------------------------------

def doc_chunked_request(trailer: bool) -> Request:
    if trailer:
        payload, seed = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER", TRAILER_SEED
        extra = (("x-amz-trailer", "x-amz-checksum-crc32c"),)
        signed = "content-encoding;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;" \
                 "x-amz-storage-class;x-amz-trailer"
    else:
        payload, seed = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD", CHUNK_SEED
        extra = (("Content-Length", "66824"),)
        signed = "content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;" \
                 "x-amz-decoded-content-length;x-amz-storage-class"
    return Request("PUT", "https", "s3.amazonaws.com", 443, "/examplebucket/chunkObject.txt", (
        ("Host", "s3.amazonaws.com"),
        ("x-amz-date", "20130524T000000Z"),
        ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
        ("Authorization", f"AWS4-HMAC-SHA256 Credential={DOC_KEY}/{DOC_SCOPE},"
                          f"SignedHeaders={signed},Signature={seed}"),
        ("x-amz-content-sha256", payload),
        ("Content-Encoding", "aws-chunked"),
        ("x-amz-decoded-content-length", "66560"),
        *extra,
    ))


def chunked_body(signatures, trailer_signature: str | None = None) -> bytes:
    """The documented body: 64 KiB and 1 KiB of 'a', then the final chunk (and trailer)."""
    body = (f"10000;chunk-signature={signatures[0]}\r\n".encode() + DOC_DATA[:65536] + b"\r\n"
            + f"400;chunk-signature={signatures[1]}\r\n".encode() + DOC_DATA[65536:] + b"\r\n"
            + f"0;chunk-signature={signatures[2]}\r\n".encode())
    if trailer_signature is None:
        return body + b"\r\n"
    return body + TRAILER + b"\r\n" + f"x-amz-trailer-signature:{trailer_signature}\r\n\r\n".encode()


def independent_chain(seed: str, trailer: bool) -> bytes:
    """The documented body signed on the chain seeded by `seed`, computed here from the spec alone."""
    key = f"AWS4{DOC_SECRET}".encode()
    for part in ("20130524", "us-east-1", "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    previous, signatures = seed, []
    for data in (DOC_DATA[:65536], DOC_DATA[65536:], b""):
        string_to_sign = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", "20130524T000000Z", DOC_SCOPE, previous,
                                    hashlib.sha256(b"").hexdigest(), hashlib.sha256(data).hexdigest()])
        previous = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
        signatures.append(previous)
    if not trailer:
        return chunked_body(signatures)
    string_to_sign = "\n".join(["AWS4-HMAC-SHA256-TRAILER", "20130524T000000Z", DOC_SCOPE, previous,
                                hashlib.sha256(TRAILER + b"\n").hexdigest()])
    return chunked_body(signatures, hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest())


def doc_body(trailer: bool) -> bytes:
    if trailer:
        return chunked_body(TRAILER_CHUNK_SIGNATURES, TRAILER_SIGNATURE)
    return chunked_body(CHUNK_SIGNATURES)


def stream(resigner, body: bytes, sizes) -> bytes:
    out, position = [], 0
    for size in sizes:
        out.append(resigner(body[position:position + size]))
        position += size
    out.append(resigner(body[position:]))
    out.append(resigner(b""))
    return b"".join(out)


def client_signature(trailer: bool):
    request = doc_chunked_request(trailer)
    return request, verified(request, DOC_TIME, DOC_SECRET)


@pytest.mark.parametrize("trailer", [False, True], ids=["chunked", "chunked-trailer"])
def test_documented_chunked_example(trailer):
    assert independent_chain(CHUNK_SEED if not trailer else TRAILER_SEED, trailer) == doc_body(trailer)
    request, signature = client_signature(trailer)
    if not trailer:
        assert len(doc_body(trailer)) == int(request.header("content-length"))

    same_seed = AwsChunkedResigner(secret_access_key=DOC_SECRET, signature=signature,
                                   new_seed_signature=signature.signature)
    assert stream(same_seed, doc_body(trailer), []) == doc_body(trailer)


@pytest.mark.parametrize("trailer", [False, True], ids=["chunked", "chunked-trailer"])
def test_chunked_body_resigned_on_the_new_seed(trailer):
    request, signature = client_signature(trailer)
    _, new_seed = resign(request.with_header_map(SSE_C), signature, DOC_SECRET, added_headers=SSE_C)
    assert new_seed != signature.signature

    resigner = body_resigner(signature, DOC_SECRET, new_seed)
    out = stream(resigner, doc_body(trailer), [])
    assert out == independent_chain(new_seed, trailer)
    assert len(out) == len(doc_body(trailer))

    checker = AwsChunkedResigner(secret_access_key=DOC_SECRET,
                                 signature=replace(signature, signature=new_seed),
                                 new_seed_signature=new_seed)
    assert stream(checker, out, []) == out


@pytest.mark.parametrize("trailer", [False, True], ids=["chunked", "chunked-trailer"])
def test_chunked_output_independent_of_split_points(trailer):
    _, signature = client_signature(trailer)
    body, new_seed = doc_body(trailer), "1" * 64
    whole = stream(AwsChunkedResigner(secret_access_key=DOC_SECRET, signature=signature,
                                      new_seed_signature=new_seed), body, [])
    rng = random.Random(20240501)
    pieces = [rng.choice([1, 2, 7, 64, 1000, 65535, 70000]) for _ in range(200)]
    for sizes in ([1] * len(body), pieces):
        assert stream(AwsChunkedResigner(secret_access_key=DOC_SECRET, signature=signature,
                                         new_seed_signature=new_seed), body, sizes) == whole


def corrupt(body: bytes, old: bytes, new: bytes) -> bytes:
    assert old in body
    return body.replace(old, new, 1)


CHUNK_MISMATCH, TRAILER_MISMATCH = "chunk signature does not match", "trailer signature does not match"


@pytest.mark.parametrize("trailer,damage,message", [
    (False, lambda b: corrupt(b, CHUNK_SIGNATURES[0][:8].encode(), b"00000000"), CHUNK_MISMATCH),
    (False, lambda b: corrupt(b, CHUNK_SIGNATURES[2][:8].encode(), b"00000000"), CHUNK_MISMATCH),
    (False, lambda b: b[:500] + b"b" + b[501:], CHUNK_MISMATCH),
    (False, lambda b: b[:-10], "ended early"),
    (False, lambda b: b + b"x", "after the end"),
    (False, lambda b: corrupt(b, b"10000;", b"10000 ;"), "malformed"),
    (False, lambda b: corrupt(b, b"\r\n400;", b"\r\r400;"), "not followed by CRLF"),
    (False, lambda b: b"1000001;chunk-signature=" + b"0" * 64 + b"\r\n", "larger than"),
    (False, lambda b: b"a" * 5000, "line too long"),
    (False, lambda b: corrupt(b, b"\r\n\r\n", b"\r\n" + TRAILER + b"\r\n\r\n"), "trailing headers"),
    (True, lambda b: corrupt(b, b"sOO8/Q==", b"sOO8/A=="), TRAILER_MISMATCH),
    (True, lambda b: corrupt(b, f"x-amz-trailer-signature:{TRAILER_SIGNATURE}\r\n".encode(), b""),
     "missing x-amz-trailer-signature"),
    (True, lambda b: corrupt(b, TRAILER_SIGNATURE[:8].encode(), b"00000000"), TRAILER_MISMATCH),
])
def test_damaged_chunked_bodies_are_refused(trailer, damage, message):
    _, signature = client_signature(trailer)
    resigner = AwsChunkedResigner(secret_access_key=DOC_SECRET, signature=signature,
                                  new_seed_signature="1" * 64)
    with pytest.raises(SignatureError, match=message):
        stream(resigner, damage(doc_body(trailer)), [])


def test_a_chunk_is_released_only_once_complete():
    _, signature = client_signature(False)
    resigner = AwsChunkedResigner(secret_access_key=DOC_SECRET, signature=signature,
                                  new_seed_signature="1" * 64)
    body = doc_body(False)
    first_chunk_end = body.index(b"400;")
    assert resigner(body[:first_chunk_end - 1]) == b""
    assert len(resigner(body[first_chunk_end - 1:first_chunk_end])) == first_chunk_end


@pytest.mark.parametrize("payload,kind", [
    (hashlib.sha256(b"x").hexdigest(), None),
    ("UNSIGNED-PAYLOAD", None),
    ("STREAMING-UNSIGNED-PAYLOAD-TRAILER", None),
    ("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", AwsChunkedResigner),
    ("STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER", AwsChunkedResigner),
    ("STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD", SignatureError),
    ("STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD-TRAILER", SignatureError),
])
def test_body_resigner_by_payload(payload, kind):
    signature = replace(client_signature(False)[1], payload_hash=payload)
    if kind is SignatureError:
        with pytest.raises(SignatureError, match="^unsupported"):
            body_resigner(signature, DOC_SECRET, "1" * 64)
    elif kind is None:
        assert body_resigner(signature, DOC_SECRET, "1" * 64) is None
    else:
        assert isinstance(body_resigner(signature, DOC_SECRET, "1" * 64), kind)


# --- Signature Version 2 (legacy clients) --------------------------------------------------------

# boto3 left at its default configuration presigns with SigV2: (endpoint, s3 config, bucket).
PRESIGN_ADDRESSING = {
    "virtual-hosted": (None, None, "bucket"),  # https://bucket.s3.amazonaws.com/key
    "path-style": ("http://127.0.0.1:9000", {"addressing_style": "path"}, "bucket"),
    "dotted-bucket": (None, None, "my.bucket"),  # not a DNS label: path-style
}
# (method, operation, parameters, headers the HTTP client must then send)
PRESIGN_CALLS = {
    "get-version-overrides": ("GET", "get_object", {
        "Key": "dir/my file+€=~.txt", "VersionId": "v 1+2",
        "ResponseContentType": "text/plain; charset=utf-8",
        "ResponseContentDisposition": 'attachment; filename="a b.txt"'}, {}),
    "put-metadata": ("PUT", "put_object",
                     {"Key": "k", "ContentType": "text/plain", "Metadata": {"colour": "red"}},
                     {"Content-Type": "text/plain"}),
    "list-v2": ("GET", "list_objects_v2", {"Prefix": "a b"}, {}),
    "get-acl": ("GET", "get_object_acl", {"Key": "k"}, {}),
    "upload-part": ("PUT", "upload_part", {"Key": "big", "PartNumber": 2, "UploadId": "x~y"}, {}),
}
V2_GET = ("GET", "get_object",
          {"Key": "dir/key.txt", "VersionId": "v1", "ResponseContentType": "text/plain"}, {})
V2_EXPIRES = int(SIGNED_AT.timestamp()) + 900
NOW = SIGNED_AT + timedelta(minutes=5)


def fetched(method: str, url: str, headers: dict | None = None) -> Request:
    """The request an HTTP client sends for a presigned URL."""
    return as_request(AWSRequest(method=method, url=url, headers=dict(headers or {})).prepare())


def v2_presigned(addressing: str, method: str, operation: str, params: dict, headers: dict, *,
                 expires: int = 900) -> Request:
    endpoint, s3, bucket = PRESIGN_ADDRESSING[addressing]
    client = boto3_client(endpoint, signature_version=None, s3=s3)
    with botocore_clock():
        url = client.generate_presigned_url(operation, Params={"Bucket": bucket, **params}, ExpiresIn=expires)
    assert "AWSAccessKeyId=" in url  # boto3's default really is SigV2
    return fetched(method, url, headers)


def v2_header_signed(method: str, url: str, headers: dict | None = None, body: bytes = b"", *,
                     auth_path: str | None = None, at: datetime = SIGNED_AT) -> Request:
    aws = AWSRequest(method=method, url=url, headers=dict(headers or {}), data=body, auth_path=auth_path)
    with botocore_clock(at):
        HmacV1Auth(Credentials(ACCESS_KEY, SECRET)).add_auth(aws)
    return as_request(aws.prepare())


def content_md5(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body).digest()).decode()


@pytest.mark.parametrize("addressing", PRESIGN_ADDRESSING)
@pytest.mark.parametrize("call", PRESIGN_CALLS)
def test_boto3_default_presigned_urls_are_sigv2_and_verify(addressing, call):
    request = v2_presigned(addressing, *PRESIGN_CALLS[call])
    signature = verified(request, SIGNED_AT + timedelta(minutes=10))
    assert signature == SigV2Signature("v2-query", ACCESS_KEY, signature.signature, V2_EXPIRES, None)


@pytest.mark.parametrize("tamper", [
    lambda r: r.with_target(r.target.replace("key.txt", "other.txt")),
    lambda r: r.with_target(r.target.replace("versionId=v1", "versionId=v2")),
    lambda r: r.with_target(r.target.replace("text%2Fplain", "text%2Fhtml")),
    lambda r: r.with_target(r.target.replace(f"Expires={V2_EXPIRES}", f"Expires={V2_EXPIRES + 3600}")),
    lambda r: r.with_target(r.target + "&acl"),
    lambda r: replace(r, method="DELETE"),
    lambda r: r.with_header_map({"x-amz-meta-colour": "red"}),
    lambda r: r.with_target(r.target + "&x-amz-acl=public-read"),
    lambda r: r.with_header_map({"Content-Type": "text/html"}),
], ids=["path", "sub-resource", "response-override", "expires", "added-sub-resource", "method",
        "amz-header", "amz-query-parameter", "content-type"])
def test_tampered_sigv2_presigned_url_is_rejected(tamper):
    request = v2_presigned("path-style", *V2_GET)
    verified(request)
    assert rejected(tamper(request)) == "signature does not match"


def test_sigv2_presigned_url_with_wrong_secret_is_rejected():
    request = v2_presigned("virtual-hosted", *V2_GET)
    assert rejected(request, secret=SECRET + "x") == "signature does not match"


def test_sigv2_presigned_expiry():
    request = v2_presigned("virtual-hosted", *V2_GET, expires=60)
    verified(request, SIGNED_AT + timedelta(seconds=60))
    assert rejected(request, SIGNED_AT + timedelta(seconds=61)) == "request has expired"


def test_sigv2_signs_sub_resources_only_and_refuses_those_it_cannot_sign():
    request = v2_presigned("path-style", *V2_GET)
    # As at S3, other parameters are outside a SigV2 signature: a cache buster is accepted.
    verified(request.with_target(request.target + "&cache-buster=1"))
    assert rejected(request.with_target(request.target + "&retention")) == \
        "unsupported: signature version 2 does not sign sub-resources: retention"
    assert rejected(request.with_target(request.target + "&%72etention&legal-hold=")) == \
        "unsupported: signature version 2 does not sign sub-resources: legal-hold, retention"


def test_every_s3_sub_resource_is_signed_by_sigv2_or_refused():
    model = botocore.session.get_session().get_service_model("s3")
    queries = [model.operation_model(name).http["requestUri"].partition("?")[2]
               for name in model.operation_names]
    literals = {part.partition("=")[0] for query in queries for part in query.split("&") if part}
    assert V2_SUBRESOURCES == set(HmacV1Auth.QSAOfInterest)
    assert V2_SUBRESOURCES.isdisjoint(V2_UNSIGNED_SUBRESOURCES)
    # list-type=2 picks ListObjectsV2, a listing like ListObjects: SigV2 leaves it unsigned, as S3 does.
    assert literals - {"list-type"} <= V2_SUBRESOURCES | V2_UNSIGNED_SUBRESOURCES


V2_HEADER_REQUESTS = {
    "put-path-style": ("PUT", object_url("dir/a b+=~.txt"), {
        "Content-Type": "text/plain", "Content-MD5": content_md5(b"body"),
        "x-amz-meta-colour": "  dark   red ", "X-Amz-Acl": "private"}, b"body", None),
    "get-version-overrides": ("GET", object_url("k", "versionId=v%2B1&response-content-type=text%2Fplain"
                                                     "&response-expires=Thu%2C%2001%20Dec%201994"),
                              {}, b"", None),
    "delete-virtual-hosted": ("DELETE", "https://bucket.s3.eu-west-1.amazonaws.com/k?versionId=1", {}, b"",
                              "/bucket/k"),
    "bucket-acl-virtual-hosted": ("PUT", "https://bucket.s3.amazonaws.com/?acl", {"x-amz-acl": "private"},
                                  b"", "/bucket/"),
}


@pytest.mark.parametrize("case", V2_HEADER_REQUESTS)
def test_botocore_sigv2_header_signatures_verify(case):
    method, url, headers, body, auth_path = V2_HEADER_REQUESTS[case]
    request = v2_header_signed(method, url, headers, body, auth_path=auth_path)
    signature = verified(request)
    assert signature == SigV2Signature("v2-header", ACCESS_KEY, signature.signature, None,
                                       formatdate(SIGNED_AT.timestamp(), usegmt=True))


@pytest.mark.parametrize("config", [
    {"signature_version": "s3", "s3": {"addressing_style": "path"}},
    {"signature_version": "s3", "s3": {"addressing_style": "virtual"}},
], ids=["path-style", "virtual-hosted"])
@pytest.mark.parametrize("call", [
    lambda c: c.put_object(Bucket="bucket", Key="a b/ü+=~.txt", Body=b"hello", ContentType="text/plain",
                           Metadata={"colour": "red"}),
    lambda c: c.get_object(Bucket="bucket", Key="k", VersionId="v+1", ResponseContentType="text/plain"),
    lambda c: c.list_objects_v2(Bucket="bucket", Prefix="a/b c"),
    lambda c: c.delete_objects(Bucket="bucket", Delete={"Objects": [{"Key": "k"}]}),
    lambda c: c.create_multipart_upload(Bucket="bucket", Key="big"),
], ids=["put", "get-version", "list-v2", "delete-objects", "create-multipart"])
def test_real_boto3_sigv2_requests_verify(call, config):
    endpoint = None if config["s3"]["addressing_style"] == "virtual" else "http://127.0.0.1:9000"
    assert verified(boto3_sent(call, endpoint, **config)).style == "v2-header"


V2_PUT = ("PUT", object_url("dir/key.txt", "tagging"),
          {"Content-Type": "text/plain", "Content-MD5": content_md5(b"body"), "x-amz-meta-colour": "red"},
          b"body")


@pytest.mark.parametrize("tamper", [
    lambda r: r.with_header_map({"x-amz-meta-colour": "blue"}),
    lambda r: r.with_header_map({"x-amz-acl": "public-read"}),
    lambda r: r.with_header_map({"Content-Type": "text/html"}),
    lambda r: r.with_header_map({"Content-MD5": content_md5(b"other")}),
    lambda r: r.with_target(r.target.replace("key.txt", "other.txt")),
    lambda r: r.with_target(r.target.replace("?tagging", "?acl")),
    lambda r: replace(r, method="POST"),
    lambda r: r.with_header_map({"Date": formatdate(SIGNED_AT.timestamp() + 1, usegmt=True)}),
    lambda r: r.with_header_map({"Host": "other.s3.amazonaws.com"}),  # virtual-hosted: bucket "other"
], ids=["amz-header", "added-amz-header", "content-type", "content-md5", "path", "sub-resource", "method",
        "date", "bucket-in-host"])
def test_tampered_sigv2_header_request_is_rejected(tamper):
    request = v2_header_signed(*V2_PUT)
    verified(request)
    assert rejected(tamper(request)) == "signature does not match"


@pytest.mark.parametrize("offset,ok", [(14, True), (-14, True), (16, False), (-16, False)])
def test_sigv2_header_auth_clock_skew(offset, ok):
    request = v2_header_signed(*V2_PUT)
    now = SIGNED_AT + timedelta(minutes=offset)
    if ok:
        verified(request, now)
    else:
        assert rejected(request, now) == "request time too skewed"


def test_sigv2_x_amz_date_replaces_date():
    # AWS's rule, which AWS SDK for Java 1.x and boto 2 follow: Date's line is left empty and
    # x-amz-date is signed among the x-amz-* headers (see docs/sigv4.md on the Delete example).
    string_to_sign = "DELETE\n\n\n\nx-amz-date:Tue, 27 Mar 2007 21:20:26 +0000\n/johnsmith/photos/puppy.jpg"
    digest = hmac.new(DOC_SECRET.encode(), string_to_sign.encode(), hashlib.sha1).digest()
    request = Request("DELETE", "https", "s3.amazonaws.com", 443, "/johnsmith/photos/puppy.jpg", (
        ("Host", "s3.amazonaws.com"),
        ("Date", "Tue, 27 Mar 2007 23:20:27 +0000"),  # ignored, even for the clock check
        ("x-amz-date", "Tue, 27 Mar 2007 21:20:26 +0000"),
        ("Authorization", f"AWS {DOC_KEY}:{base64.b64encode(digest).decode()}"),
    ))
    now = datetime(2007, 3, 27, 21, 30, tzinfo=timezone.utc)
    assert verified(request, now, DOC_SECRET).date == "Tue, 27 Mar 2007 21:20:26 +0000"
    changed = request.with_header_map({"x-amz-date": "Tue, 27 Mar 2007 21:20:27 +0000"})
    assert rejected(changed, now, DOC_SECRET) == "signature does not match"


# AWS's SigV2 examples (docs/sigv4.md): signatures computed for the bucket "johnsmith".
V2_DOC_EXAMPLES = {
    "object-get": ("GET", "johnsmith.s3.amazonaws.com", "/photos/puppy.jpg",
                   {"Date": "Tue, 27 Mar 2007 19:36:42 +0000"}, "bWq2s1WEIj+Ydj0vQ697zp+IXMU="),
    "object-put": ("PUT", "johnsmith.s3.amazonaws.com", "/photos/puppy.jpg",
                   {"Content-Type": "image/jpeg", "Content-Length": "94328",
                    "Date": "Tue, 27 Mar 2007 21:15:45 +0000"}, "MyyxeRY7whkBe+bq8fHCL/2kKUg="),
    "list": ("GET", "johnsmith.s3.amazonaws.com", "/?prefix=photos&max-keys=50&marker=puppy",
             {"User-Agent": "Mozilla/5.0", "Date": "Tue, 27 Mar 2007 19:42:41 +0000"},
             "htDYFYduRNen8P9ZfE/s9SuKy0U="),
    "fetch-acl": ("GET", "johnsmith.s3.amazonaws.com", "/?acl",
                  {"Date": "Tue, 27 Mar 2007 19:44:46 +0000"}, "c2WLPFtWHVgbEmeEG93a4cG37dM="),
    "list-all-my-buckets": ("GET", "s3.amazonaws.com", "/",
                            {"Date": "Wed, 28 Mar 2007 01:29:59 +0000"}, "qGdzdERIC03wnaRNKh6OqZehG9s="),
    "unicode-keys": ("GET", "s3.amazonaws.com", "/dictionary/fran%C3%A7ais/pr%c3%a9f%c3%a8re",
                     {"Date": "Wed, 28 Mar 2007 01:49:49 +0000"}, "DNEZGsoieTZ92F3bUfSPQcbGmlM="),
}


@pytest.mark.parametrize("example", V2_DOC_EXAMPLES)
def test_aws_documented_sigv2_examples_verify(example):
    method, host, target, headers, signature = V2_DOC_EXAMPLES[example]
    request = Request(method, "https", host, 443, target, (
        ("Host", host), *headers.items(), ("Authorization", f"AWS {DOC_KEY}:{signature}")))
    verified(request, parsedate_to_datetime(headers["Date"]), DOC_SECRET)


def test_aws_documented_sigv2_presigned_url_verifies():
    target = ("/photos/puppy.jpg?AWSAccessKeyId=AKIAIOSFODNN7EXAMPLE"
              "&Signature=NpgCjnDzrM%2BWFzoENXmpNDUsSn8%3D&Expires=1175139620")
    request = Request("GET", "https", "johnsmith.s3.amazonaws.com", 443, target,
                      (("Host", "johnsmith.s3.amazonaws.com"),))
    expires = datetime.fromtimestamp(1175139620, timezone.utc)
    verified(request, expires, DOC_SECRET)
    assert rejected(request, expires + timedelta(seconds=1), DOC_SECRET) == "request has expired"


def test_canonicalized_amz_headers_documented_upload_example():
    request = bare("/db-backup.dat.gz",
                   ("x-amz-acl", "public-read"), ("content-type", "application/x-download"),
                   ("X-Amz-Meta-ReviewedBy", "joe@johnsmith.net"),
                   ("X-Amz-Meta-ReviewedBy", "jane@johnsmith.net"),
                   ("X-Amz-Meta-FileChecksum", "0x02661779"), ("X-Amz-Meta-ChecksumAlgorithm", "crc32"))
    assert canonicalized_amz_headers(request) == (
        "x-amz-acl:public-read\nx-amz-meta-checksumalgorithm:crc32\nx-amz-meta-filechecksum:0x02661779\n"
        "x-amz-meta-reviewedby:joe@johnsmith.net,jane@johnsmith.net\n")
    assert canonicalized_amz_headers(bare("/k?x-amz-meta-a=%20b%20&prefix=x", ("X-Amz-Meta-A", " a "))) == \
        "x-amz-meta-a:a,b\n"


@pytest.mark.parametrize("host,target,resource", [
    ("bucket.s3.amazonaws.com", "/a%20b/k", "/bucket/a%20b/k"),
    ("my.bucket.s3.eu-west-1.amazonaws.com:443", "/", "/my.bucket/"),
    ("Bucket.S3-eu-west-1.amazonaws.com", "/k", "/bucket/k"),
    ("bucket.s3.dualstack.us-east-1.amazonaws.com", "/k", "/bucket/k"),
    ("bucket.s3.cn-north-1.amazonaws.com.cn", "/k", "/bucket/k"),
    ("s3.amazonaws.com", "/bucket", "/bucket/"),
    ("s3.eu-west-1.amazonaws.com", "/", "/"),
    ("127.0.0.1:9000", "/bucket/k?uploadId=u&acl&prefix=p&versionId=a%2Bb+c&acl=",
     "/bucket/k?acl&acl=&uploadId=u&versionId=a+b c"),
    ("127.0.0.1:9000", "/bucket/k?%61cl&response-content-type=text%2Fplain",
     "/bucket/k?acl&response-content-type=text/plain"),
])
def test_canonicalized_resource(host, target, resource):
    request = Request("GET", "https", "unused", 443, target, (("Host", host),))
    assert canonicalized_resource(request) == resource


SIG = "frJIUN8DYpKDtOLCwo//yllqDzg="
DATE = ("Date", "Mon, 26 Mar 2007 19:37:58 +0000")
V2_QUERY = f"AWSAccessKeyId=AKIDEXAMPLE&Signature={quote(SIG, safe='')}"


@pytest.mark.parametrize("request_,message", [
    (bare("/bucket/k", ("Authorization", "AWS AKIDEXAMPLE"), DATE), "malformed Authorization header"),
    (bare("/bucket/k", ("Authorization", f"AWS :{SIG}"), DATE), "malformed Authorization header"),
    (bare("/bucket/k", ("Authorization", "AWS AKIDEXAMPLE:c2lnbmF0dXJl"), DATE), "malformed signature"),
    (bare("/bucket/k", ("Authorization", f"AWS AKIDEXAMPLE:{SIG}")), "missing x-amz-date or Date header"),
    (bare("/bucket/k", ("Authorization", f"AWS AKIDEXAMPLE:{SIG}"), ("Date", "yesterday")),
     "malformed request date"),
    (bare(f"/bucket/k?{V2_QUERY}"), "missing query parameters: Expires"),
    (bare(f"/bucket/k?{V2_QUERY}&Expires=1&Signature=x"), "Signature given more than once"),
    (bare(f"/bucket/k?{V2_QUERY}&Expires=%C2%B2"), "malformed Expires"),
    (bare(f"/bucket/k?{V2_QUERY.replace('AKIDEXAMPLE', '')}&Expires=1"), "malformed AWSAccessKeyId"),
    (bare("/bucket/k?AWSAccessKeyId=AKIDEXAMPLE&Signature=c2ln&Expires=1"), "malformed signature"),
    (bare(f"/bucket/k?{V2_QUERY}&Expires=1", ("Authorization", f"AWS AKIDEXAMPLE:{SIG}"), DATE),
     "only one auth mechanism allowed"),
    (bare(f"/bucket/k?{V2_QUERY}&Expires=1&X-Amz-Signature=00"), "only one auth mechanism allowed"),
], ids=["no-signature", "no-key-id", "short-signature", "no-date", "bad-date", "no-expires", "repeated",
        "bad-expires", "empty-key-id", "bad-query-signature", "header-and-query", "v2-and-v4-query"])
def test_malformed_sigv2_authentication(request_, message):
    with pytest.raises(SignatureError) as error:
        read_signature(request_)
    assert str(error.value) == message


@pytest.mark.parametrize("addressing", PRESIGN_ADDRESSING)
@pytest.mark.parametrize("call", PRESIGN_CALLS)
def test_resign_sigv2_presigned_as_sigv4_header_auth(addressing, call):
    method, _, _, headers = PRESIGN_CALLS[call]
    client = v2_presigned(addressing, *PRESIGN_CALLS[call])
    signature = verified(client, NOW)

    forwarded, new_signature = resign(client.with_header_map(SSE_C), signature, SECRET, added_headers=SSE_C,
                                      region=REGION, now=NOW)

    v2_auth = ("AWSAccessKeyId=", "Signature=", "Expires=")
    assert forwarded.path == client.path
    kept = [part for part in client.raw_query.split("&") if not part.startswith(v2_auth)]
    assert forwarded.raw_query == "&".join(kept)
    reference = header_signed(method, f"{client.scheme}://{client.authority}{forwarded.target}",
                              {**headers, **SSE_C}, unsigned_payload=True, at=NOW)
    assert forwarded.header("authorization") == reference.header("authorization")
    assert forwarded.header("authorization").endswith(f"Signature={new_signature}")
    assert body_resigner(signature, SECRET, new_signature) is None
    verified(forwarded, NOW)


def test_resign_sigv2_header_auth_as_sigv4_header_auth():
    method, url, headers, body = V2_PUT
    client = v2_header_signed(*V2_PUT)
    signature = verified(client)

    forwarded, new_signature = resign(client.with_header_map(SSE_C), signature, SECRET, added_headers=SSE_C,
                                      region=REGION, now=NOW)

    assert forwarded.target == client.target
    assert forwarded.header("date") is None  # the SigV2 time stamp; x-amz-date now dates the request
    assert forwarded.header("x-amz-date") == NOW.strftime("%Y%m%dT%H%M%SZ")
    assert read_signature(forwarded).signed_headers == tuple(sorted(
        {"content-md5", "content-type", "host", "x-amz-content-sha256", "x-amz-date", "x-amz-meta-colour"}
        | {name.lower() for name in SSE_C}))
    reference = header_signed(method, url, {**headers, **SSE_C}, body, unsigned_payload=True, at=NOW)
    assert forwarded.header("authorization") == reference.header("authorization")
    assert body_resigner(signature, SECRET, new_signature) is None
    verified(forwarded, NOW)


def test_resign_sigv4_ignores_region_and_now():
    client = header_signed(*BASE)
    signature = verified(client)
    forwarded = client.with_header_map(SSE_C)
    assert resign(forwarded, signature, SECRET, added_headers=SSE_C, region="us-west-2", now=NOW) == \
        resign(forwarded, signature, SECRET, added_headers=SSE_C)
