"""proxy.signers.s3 against botocore (the reference signer) and against AWS's documented examples."""
from __future__ import annotations

import base64
import hashlib
import hmac
import io
import random
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from unittest import mock
from urllib.parse import quote, urlsplit

import boto3
import pytest
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from proxy.message import Request
from proxy.signers.s3 import (
    AwsChunkedResigner,
    SignatureError,
    body_resigner,
    canonical_headers,
    canonical_query_string,
    canonical_uri,
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
    with mock.patch("botocore.auth.get_current_datetime", return_value=at.replace(tzinfo=None)):
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


def boto3_client(endpoint: str = "http://127.0.0.1:9000"):
    return boto3.client(
        "s3", region_name=REGION, endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                      retries={"max_attempts": 0}),
    )


class _Sent(Exception):
    pass


def boto3_sent(call, endpoint: str = "http://127.0.0.1:9000") -> Request:
    """The request a real boto3 client call sends (captured before it reaches the network)."""
    client = boto3_client(endpoint)
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
    bare("/bucket/k", ("Authorization", "AWS AKIDEXAMPLE:c2lnbmF0dXJl")),
    bare("/bucket/k?AWSAccessKeyId=AKIDEXAMPLE&Expires=1&Signature=c2ln"),
    bare("/bucket/k", ("Authorization", "AWS4-ECDSA-P256-SHA256 Credential=a/20240501/s3/aws4_request, "
                                        "SignedHeaders=host, Signature=00")),
    bare("/bucket/k?X-Amz-Algorithm=AWS4-ECDSA-P256-SHA256"),
], ids=["sigv2-header", "sigv2-query", "sigv4a-header", "sigv4a-query"])
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
