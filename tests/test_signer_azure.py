"""keycourier.signers.azure against the azure-storage-blob SDK: requests are built by the SDK and captured
before sending, and its SharedKeyCredentialPolicy is the reference signer."""
from __future__ import annotations

import base64
import hashlib
import random
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import pytest
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.pipeline.transport import HttpRequest, HttpTransport
from azure.storage.blob import (
    BlobBlock,
    BlobClient,
    BlobSasPermissions,
    BlobServiceClient,
    CustomerProvidedEncryptionKey,
    generate_blob_sas,
)
from azure.storage.blob._shared import sign_string
from azure.storage.blob._shared.authentication import SharedKeyCredentialPolicy, _storage_header_sort

from keycourier.message import Request
from keycourier.signers.azure import (
    SharedKeySignature,
    SignatureError,
    body_resigner,
    canonicalized_resource,
    header_sort_key,
    lite_canonicalized_resource,
    lite_string_to_sign,
    read_signature,
    resign,
    string_to_sign,
    verify,
)

ACCOUNT = "kcaccount"
ACCOUNT_KEY = base64.b64encode(bytes(range(64))).decode()
OTHER_KEY = base64.b64encode(bytes(range(1, 65))).decode()
ACCOUNT_URLS = {
    "host": f"https://{ACCOUNT}.blob.core.windows.net",
    "ip": f"https://127.0.0.1:10000/{ACCOUNT}",  # emulator (Azurite) style
}
CONTAINER = "photos"
BLOB = "dir/holiday 2024+1.jpg"
SOURCE_URL = f"https://{ACCOUNT}.blob.core.windows.net/{CONTAINER}/source.jpg"


def _cpk_headers(prefix: str, key: bytes) -> dict[str, str]:
    return {
        f"{prefix}key": base64.b64encode(key).decode(),
        f"{prefix}key-sha256": base64.b64encode(hashlib.sha256(key).digest()).decode(),
        f"{prefix}algorithm": "AES256",
    }


CLIENT_KEY = bytes(range(32))
PROXY_KEY = bytes(range(100, 132))
CLIENT_CPK = _cpk_headers("x-ms-encryption-", CLIENT_KEY)
CPK = CustomerProvidedEncryptionKey(CLIENT_CPK["x-ms-encryption-key"],
                                    CLIENT_CPK["x-ms-encryption-key-sha256"])


# --- Capturing the SDK's requests ---------------------------------------------------------------

class _Captured(Exception):
    pass


class _CapturingTransport(HttpTransport):
    """Records the request the SDK would send, then stops it."""

    def __init__(self):
        self.requests: list[HttpRequest] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass

    def open(self):
        pass

    def close(self):
        pass

    def send(self, request, **kwargs):
        self.requests.append(request)
        raise _Captured


def _as_request(http_request: HttpRequest) -> Request:
    url = urlsplit(http_request.url)
    target = url.path + (f"?{url.query}" if url.query else "")
    headers = (("Host", url.netloc), *http_request.headers.items())
    return Request(http_request.method, url.scheme, url.hostname, url.port or 443, target, headers)


def _captured(style: str, operation) -> Request:
    transport = _CapturingTransport()
    service = BlobServiceClient(ACCOUNT_URLS[style], transport=transport,
                                credential={"account_name": ACCOUNT, "account_key": ACCOUNT_KEY})
    with pytest.raises(_Captured):
        operation(service.get_blob_client(CONTAINER, BLOB), service)
    (http_request,) = transport.requests
    return _as_request(http_request)


def _signed_at(request: Request) -> datetime:
    return parsedate_to_datetime(request.header("x-ms-date"))


def _reference_signature(request: Request) -> str:
    """The signature SharedKeyCredentialPolicy computes for `request` as it stands."""
    url = f"{request.scheme}://{request.authority}{request.target}"
    http_request = HttpRequest(request.method, url)
    for name, value in request.headers:
        if name.lower() not in ("host", "authorization"):
            http_request.headers[name.lower()] = value  # the SDK only picks up lower-case x-ms- names
    SharedKeyCredentialPolicy(ACCOUNT, ACCOUNT_KEY).on_request(
        PipelineRequest(http_request, PipelineContext(None)))
    return http_request.headers["Authorization"].rpartition(":")[2]


OPERATIONS = {
    "upload_blob": lambda blob, _, **cpk: blob.upload_blob(b"hello world", overwrite=True, **cpk),
    "download_blob_range": lambda blob, _, **cpk: blob.download_blob(offset=5, length=100, **cpk),
    "stage_block": lambda blob, _, **cpk: blob.stage_block("YmxvY2stMDAx", b"block data", **cpk),
    "commit_block_list": lambda blob, _, **cpk: blob.commit_block_list(
        [BlobBlock("YmxvY2stMDAx"), BlobBlock("YmxvY2stMDAy")], metadata={"owner": "kc"}, **cpk),
    "get_blob_properties": lambda blob, _, **cpk: blob.get_blob_properties(**cpk),
    "set_blob_metadata": lambda blob, _, **cpk: blob.set_blob_metadata(
        {"i0": "a", "i_": "b", "test-a": "c", "test_z": "d"}, **cpk),
    "start_copy_from_url": lambda blob, _, **cpk: blob.start_copy_from_url(SOURCE_URL, **cpk),
    "list_blobs": lambda _, service, **cpk: next(iter(
        service.get_container_client(CONTAINER).list_blobs(name_starts_with="dir/holiday 2024", **cpk))),
}
CPK_OPERATIONS = ("upload_blob", "download_blob_range", "stage_block", "commit_block_list",
                  "get_blob_properties", "set_blob_metadata")
CASES = [(name, False) for name in OPERATIONS] + [(name, True) for name in CPK_OPERATIONS]


def _sdk_request(style: str, name: str, with_cpk: bool) -> Request:
    cpk = {"cpk": CPK} if with_cpk else {}
    return _captured(style, lambda blob, service: OPERATIONS[name](blob, service, **cpk))


@pytest.fixture(params=list(ACCOUNT_URLS))
def style(request) -> str:
    return request.param


@pytest.fixture
def upload(style) -> Request:
    return _sdk_request(style, "upload_blob", with_cpk=True)


# --- Reading and verifying what the SDK signs ---------------------------------------------------

@pytest.mark.parametrize(("name", "with_cpk"), CASES)
def test_sdk_requests_verify(style, name, with_cpk):
    request = _sdk_request(style, name, with_cpk)
    signature = read_signature(request)
    assert signature.style == "sharedkey"
    assert signature.access_key_id == ACCOUNT
    verify(request, signature, ACCOUNT_KEY, _signed_at(request))


def test_download_with_range_signs_x_ms_range(style):
    request = _sdk_request(style, "download_blob_range", with_cpk=False)
    assert request.header("x-ms-range") == "bytes=5-104"


@pytest.mark.parametrize("header", ["x-ms-date", "x-ms-version", "x-ms-blob-type", "x-ms-encryption-key",
                                    "x-ms-encryption-key-sha256", "x-ms-encryption-algorithm",
                                    "x-ms-client-request-id"])
def test_changed_x_ms_header_is_refused(upload, header):
    tampered = upload.with_header_map({header: upload.header(header) + "0"})
    with pytest.raises(SignatureError, match="signature does not match"):
        verify(tampered, read_signature(tampered), ACCOUNT_KEY, _signed_at(upload))


@pytest.mark.parametrize("changes", [
    {"x-ms-meta-added": "1"},
    {"x-ms-encryption-key": None},
    {"Content-Type": "text/plain"},
    {"Content-Length": "6"},
    {"If-Match": "\"etag\""},
], ids=["added", "removed", "content-type", "content-length", "if-match"])
def test_other_header_changes_are_refused(upload, changes):
    tampered = upload.with_header_map(changes)
    with pytest.raises(SignatureError, match="signature does not match"):
        verify(tampered, read_signature(tampered), ACCOUNT_KEY, _signed_at(upload))


@pytest.mark.parametrize("mutate", [
    lambda r: r.with_target(r.target.replace(CONTAINER, "others")),
    lambda r: r.with_target(r.target.replace("%20", "%2520")),
    lambda r: r.with_target(r.target + "?comp=metadata"),
    lambda r: replace(r, method="POST"),
], ids=["container", "encoding", "query", "method"])
def test_changed_path_query_or_method_is_refused(upload, mutate):
    tampered = mutate(upload)
    with pytest.raises(SignatureError, match="signature does not match"):
        verify(tampered, read_signature(tampered), ACCOUNT_KEY, _signed_at(upload))


def test_changed_query_value_is_refused(style):
    request = _sdk_request(style, "list_blobs", with_cpk=False)
    tampered = request.with_target(request.target.replace("prefix=dir", "prefix=dis"))
    with pytest.raises(SignatureError, match="signature does not match"):
        verify(tampered, read_signature(tampered), ACCOUNT_KEY, _signed_at(request))


def test_wrong_key_or_account_is_refused(upload):
    signature = read_signature(upload)
    with pytest.raises(SignatureError, match="signature does not match") as error:
        verify(upload, signature, OTHER_KEY, _signed_at(upload))
    assert OTHER_KEY not in str(error.value) and signature.signature not in str(error.value)
    other_account = replace(signature, access_key_id="otheraccount")
    with pytest.raises(SignatureError, match="signature does not match"):
        verify(upload, other_account, ACCOUNT_KEY, _signed_at(upload))


@pytest.mark.parametrize("offset", [timedelta(minutes=16), -timedelta(minutes=16)])
def test_skewed_time_is_refused(upload, offset):
    with pytest.raises(SignatureError, match="too skewed"):
        verify(upload, read_signature(upload), ACCOUNT_KEY, _signed_at(upload) + offset)


def test_skew_within_fifteen_minutes_is_accepted(upload):
    verify(upload, read_signature(upload), ACCOUNT_KEY, _signed_at(upload) + timedelta(minutes=14))


def test_date_header_dates_a_request_without_x_ms_date(upload):
    signed_at = _signed_at(upload)
    request = upload.with_header_map({"x-ms-date": None, "Date": upload.header("x-ms-date")})
    request, _ = resign(request, read_signature(request), ACCOUNT_KEY, added_headers=())
    verify(request, read_signature(request), ACCOUNT_KEY, signed_at)
    with pytest.raises(SignatureError, match="too skewed"):
        verify(request, read_signature(request), ACCOUNT_KEY, signed_at + timedelta(hours=1))


def test_date_beside_x_ms_date_may_be_signed_or_left_empty(upload):
    """The SDK signs a Date header's value; the docs let a client leave its line empty instead."""
    request = upload.with_header_map({"Date": "Tue, 01 Jan 2030 00:00:00 GMT"})
    sdk_authorization = f"SharedKey {ACCOUNT}:{_reference_signature(request)}"
    signed = request.with_header_map({"Authorization": sdk_authorization})
    left_empty = request.with_header_map({"Authorization": upload.header("authorization")})
    for client_request in (signed, left_empty):
        verify(client_request, read_signature(client_request), ACCOUNT_KEY, _signed_at(upload))
        resigned, _ = resign(client_request, read_signature(client_request), ACCOUNT_KEY, added_headers=())
        assert resigned.header("authorization") == sdk_authorization


@pytest.mark.parametrize(("changes", "reason"), [
    ({"x-ms-date": None}, "missing x-ms-date or Date"),
    ({"x-ms-date": "yesterday"}, "malformed request date"),
])
def test_missing_or_malformed_date_is_refused(upload, changes, reason):
    request = upload.with_header_map(changes)
    with pytest.raises(SignatureError, match=reason):
        verify(request, read_signature(request), ACCOUNT_KEY, _signed_at(upload))


# --- Re-signing after keycourier adds its headers -----------------------------------------------

@pytest.mark.parametrize(("name", "with_cpk"), CASES)
def test_resign_after_adding_cpk_matches_the_sdk(style, name, with_cpk):
    request = _sdk_request(style, name, with_cpk)
    signature = read_signature(request)
    verify(request, signature, ACCOUNT_KEY, _signed_at(request))
    added = _cpk_headers("x-ms-encryption-", PROXY_KEY)
    if name == "start_copy_from_url":
        added |= _cpk_headers("x-ms-source-encryption-", CLIENT_KEY)
    changed = request.with_header_map(added)
    with pytest.raises(SignatureError):
        verify(changed, signature, ACCOUNT_KEY, _signed_at(request))

    resigned, new_signature = resign(changed, signature, ACCOUNT_KEY, added_headers=added)

    assert new_signature == _reference_signature(changed)
    assert resigned.header("authorization") == f"SharedKey {ACCOUNT}:{new_signature}"
    assert [name for name, _ in resigned.headers].count("Authorization") == 1
    unsigned = {"Authorization": None}
    assert resigned.with_header_map(unsigned) == changed.with_header_map(unsigned)
    verify(resigned, read_signature(resigned), ACCOUNT_KEY, _signed_at(request))


def test_resign_keeps_the_authorization_header_name(upload):
    renamed = upload.with_header_map({"Authorization": None, "authorization": upload.header("authorization")})
    resigned, _ = resign(renamed, read_signature(renamed), ACCOUNT_KEY, added_headers=())
    assert [name for name, _ in resigned.headers if name.lower() == "authorization"] == ["authorization"]


def test_resign_of_an_unchanged_request_gives_the_clients_signature(upload):
    signature = read_signature(upload)
    _, new_signature = resign(upload, signature, ACCOUNT_KEY, added_headers=())
    assert new_signature == signature.signature


def test_body_is_never_resigned(upload):
    assert body_resigner(read_signature(upload), ACCOUNT_KEY, "seed") is None


# --- The signing steps --------------------------------------------------------------------------

def test_canonicalized_resource_of_both_host_styles():
    host = Request("GET", "https", f"{ACCOUNT}.blob.core.windows.net", 443, "/c/b%20x?comp=metadata")
    ip = Request("GET", "https", "127.0.0.1", 10000, f"/{ACCOUNT}/c/b%20x?comp=metadata")
    assert canonicalized_resource(host, ACCOUNT) == f"/{ACCOUNT}/c/b%20x\ncomp:metadata"
    assert canonicalized_resource(ip, ACCOUNT) == f"/{ACCOUNT}/{ACCOUNT}/c/b%20x\ncomp:metadata"


def test_canonicalized_resource_query_rules():
    """Names lowercased and sorted, values decoded ('+' kept, as the SDK does), a repeated name's values
    sorted and comma-joined."""
    request = Request("GET", "https", "h", 443, "/c?restype=container&Comp=list&include=snapshots"
                                                "&include=metadata&prefix=a%2Fb%20c+d&marker=")
    assert canonicalized_resource(request, ACCOUNT) == (
        f"/{ACCOUNT}/c\ncomp:list\ninclude:metadata,snapshots\nmarker:\nprefix:a/b c+d\nrestype:container")


# The examples of "Authorize with Shared Key" (docs/azure-sharedkey.md).
DOC_GET_CONTAINER_METADATA = (
    "GET\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:Sun, 11 Oct 2009 21:49:13 GMT\nx-ms-version:2009-09-19\n"
    "/myaccount/mycontainer\ncomp:metadata\nrestype:container\ntimeout:20")
DOC_CREATE_CONTAINER_2015 = (
    "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:Fri, 26 Jun 2015 23:39:12 GMT\nx-ms-version:2015-02-21\n"
    "/myaccount/mycontainer\nrestype:container\ntimeout:30")


def test_documented_string_to_sign_examples():
    get = Request("GET", "http", "myaccount.blob.core.windows.net", 80,
                  "/mycontainer?restype=container&comp=metadata&timeout=20",
                  (("x-ms-date", "Sun, 11 Oct 2009 21:49:13 GMT"), ("x-ms-version", "2009-09-19")))
    assert string_to_sign(get, "myaccount") == DOC_GET_CONTAINER_METADATA
    put = Request("PUT", "http", "myaccount.blob.core.windows.net", 80,
                  "/mycontainer?restype=container&timeout=30",
                  (("x-ms-version", "2015-02-21"), ("x-ms-date", "Fri, 26 Jun 2015 23:39:12 GMT"),
                   ("Content-Length", "0")))
    assert string_to_sign(put, "myaccount") == DOC_CREATE_CONTAINER_2015
    old = put.with_header_map({"x-ms-version": "2014-02-14"})
    assert string_to_sign(old, "myaccount").split("\n")[3] == "0"


def test_documented_list_blobs_resource():
    request = Request("GET", "http", "myaccount.blob.core.windows.net", 80, "/mycontainer?restype=container"
                      "&comp=list&include=snapshots&include=metadata&include=uncommittedblobs")
    assert canonicalized_resource(request, "myaccount") == (
        "/myaccount/mycontainer\ncomp:list\ninclude:metadata,snapshots,uncommittedblobs\nrestype:container")


def test_string_to_sign_lines():
    request = Request("GET", "https", "h", 443, "/c/b", (
        ("Range", "bytes=0-9"), ("If-Match", '"e"'), ("x-ms-version", "2026-10-06"),
        ("X-MS-Date", "Mon, 23 Nov 2026 11:00:00 GMT"), ("x-ms-meta-a", " spaced  inside "),
        ("x-ms-meta-empty", ""), ("User-Agent", "not signed")))
    assert string_to_sign(request, ACCOUNT) == (
        "GET\n\n\n\n\n\n\n\n" '"e"' "\n\n\nbytes=0-9\n"
        "x-ms-date:Mon, 23 Nov 2026 11:00:00 GMT\nx-ms-meta-a:spaced  inside\nx-ms-meta-empty:\n"
        f"x-ms-version:2026-10-06\n/{ACCOUNT}/c/b")


def test_empty_x_ms_headers_are_left_out_before_2016_05_31():
    request = Request("GET", "https", "h", 443, "/c/b", (("x-ms-version", "2015-12-11"), ("x-ms-meta-e", "")))
    assert "x-ms-meta-e" not in string_to_sign(request, ACCOUNT)
    assert "x-ms-meta-e:\n" in string_to_sign(request.with_headers(x_ms_version="2016-05-31"), ACCOUNT)


@pytest.mark.parametrize("header", ["x-ms-meta-a", "Content-Type"])
def test_header_given_twice_is_refused(upload, header):
    request = replace(upload, headers=upload.headers + ((header, "1"), (header, "2")))
    with pytest.raises(SignatureError, match=f"header given more than once: {header.lower()}"):
        verify(request, read_signature(request), ACCOUNT_KEY, _signed_at(upload))


def test_header_order_is_the_sdks_service_order():
    # The service's expected order, as quoted in Azure/azure-sdk-for-python#33951.
    expected = ["x-ms-blob-type", "x-ms-client-request-id", "x-ms-date", "x-ms-meta-test", "x-ms-meta-test-",
                "x-ms-meta-test--", "x-ms-meta-test_-", "x-ms-meta-test-_", "x-ms-meta-test__",
                "x-ms-meta-test_a", "x-ms-meta-test_a-", "x-ms-meta-test-_a", "x-ms-meta-test_a_",
                "x-ms-meta-test_a-_", "x-ms-meta-test_z", "x-ms-meta-test-a", "x-ms-version"]
    assert sorted(reversed(expected), key=header_sort_key) == expected
    shuffled = random.Random(7)
    alphabet = "!#$%&'*+-.^_`|~0123456789abcxyz"
    for _ in range(2000):
        names = ["".join(shuffled.choices(alphabet, k=shuffled.randint(0, 6))) for _ in range(5)]
        names = list(dict.fromkeys(names))
        reference = [name for name, _ in _storage_header_sort([(name, "") for name in names])]
        assert sorted(names, key=header_sort_key) == reference, names


def test_header_name_outside_http_tokens_is_refused(upload):
    request = upload.with_header_map({"x-ms-meta-bad@name": "1"})
    with pytest.raises(SignatureError, match="header name"):
        verify(request, read_signature(request), ACCOUNT_KEY, _signed_at(upload))


# --- Shared Key Lite ----------------------------------------------------------------------------

# The Put Blob example of "Authorize with Shared Key" (docs/azure-sharedkey.md).
DOC_LITE_PUT_BLOB = ("PUT\n\ntext/plain; charset=UTF-8\n\nx-ms-date:Sun, 20 Sep 2009 20:36:40 GMT\n"
                     "x-ms-meta-m1:v1\nx-ms-meta-m2:v2\n/testaccount1/mycontainer/hello.txt")
LITE_DATE = "Mon, 23 Nov 2026 11:00:00 GMT"


def test_documented_lite_string_to_sign():
    request = Request("PUT", "http", "testaccount1.blob.core.windows.net", 80, "/mycontainer/hello.txt", (
        ("Content-Type", "text/plain; charset=UTF-8"), ("x-ms-meta-m2", "v2"),
        ("x-ms-date", "Sun, 20 Sep 2009 20:36:40 GMT"), ("x-ms-meta-m1", "v1"), ("Content-Length", "11")))
    assert lite_string_to_sign(request, "testaccount1") == DOC_LITE_PUT_BLOB


def test_lite_resource_signs_only_comp():
    host = Request("PUT", "https", "h", 443, "/c/b%20x?blockid=YQ%3D%3D&comp=block&timeout=30")
    ip = Request("PUT", "https", "h", 443, f"/{ACCOUNT}/c/b%20x?timeout=30")
    assert lite_canonicalized_resource(host, ACCOUNT) == f"/{ACCOUNT}/c/b%20x?comp=block"
    assert lite_canonicalized_resource(ip, ACCOUNT) == f"/{ACCOUNT}/{ACCOUNT}/c/b%20x"


def _lite_request(*extra_headers: tuple[str, str]) -> tuple[Request, str]:
    """A Put Block request signed with Shared Key Lite over a string to sign written out by hand."""
    x_ms_headers = (("x-ms-version", "2026-10-06"), ("x-ms-date", LITE_DATE), *extra_headers)
    headers = (*x_ms_headers, ("Content-Type", "application/x"), ("Content-Length", "10"))
    # Plain names, so code-point order is the service's order.
    x_ms_lines = "".join(f"{name}:{value}\n" for name, value in sorted(x_ms_headers))
    expected = f"PUT\n\napplication/x\n\n{x_ms_lines}/{ACCOUNT}/c/b?comp=block"
    signature = sign_string(ACCOUNT_KEY, expected)
    request = Request("PUT", "https", f"{ACCOUNT}.blob.core.windows.net", 443,
                      "/c/b?comp=block&blockid=YQ%3D%3D",
                      (*headers, ("Authorization", f"SharedKeyLite {ACCOUNT}:{signature}")))
    return request, signature


def test_lite_request_verifies_and_is_resigned_with_lite():
    request, _ = _lite_request(("x-ms-encryption-algorithm", "AES256"))
    signature = read_signature(request)
    assert signature.style == "sharedkeylite" and signature.access_key_id == ACCOUNT
    now = parsedate_to_datetime(LITE_DATE)
    verify(request, signature, ACCOUNT_KEY, now)
    # Lite signs neither Content-Length nor query parameters other than comp: the service would not see these.
    verify(request.with_target("/c/b?comp=block&blockid=Yg%3D%3D").with_headers(content_length="1"),
           signature, ACCOUNT_KEY, now)
    with pytest.raises(SignatureError, match="signature does not match"):
        verify(request.with_headers(x_ms_version="2025-01-05"), signature, ACCOUNT_KEY, now)
    with pytest.raises(SignatureError, match="too skewed"):
        verify(request, signature, ACCOUNT_KEY, now + timedelta(minutes=16))

    added = _cpk_headers("x-ms-encryption-", PROXY_KEY)
    resigned, new_signature = resign(request.with_header_map(added), signature, ACCOUNT_KEY,
                                     added_headers=added)

    assert new_signature == _lite_request(*added.items())[1]
    assert resigned.header("authorization") == f"SharedKeyLite {ACCOUNT}:{new_signature}"
    verify(resigned, read_signature(resigned), ACCOUNT_KEY, now)


# --- Reading the Authorization header -----------------------------------------------------------

def test_anonymous_request_has_no_signature():
    assert read_signature(Request("GET", "https", "h", 443, "/c/b")) is None


@pytest.mark.parametrize(("value", "reason"), [
    ("Basic dXNlcjpwYXNz", "unsupported authorization scheme"),
    (f"SharedKey {ACCOUNT}", "malformed Authorization header"),
    (f"SharedKey {ACCOUNT}:not-base64", "malformed signature"),
])
def test_unusable_authorization_is_refused(value, reason):
    request = Request("GET", "https", "h", 443, "/c/b", (("Authorization", value),))
    with pytest.raises(SignatureError, match=reason):
        read_signature(request)


def test_two_auth_mechanisms_are_refused(upload):
    with pytest.raises(SignatureError, match="only one auth mechanism"):
        read_signature(upload.with_target(upload.target + "?sig=abc"))
    with pytest.raises(SignatureError, match="more than one Authorization"):
        read_signature(replace(upload, headers=upload.headers + (("Authorization", "Bearer t"),)))


# --- SAS and bearer tokens: not checked, not re-signed ------------------------------------------

def _sas_request(style: str) -> Request:
    sas = generate_blob_sas(ACCOUNT, CONTAINER, BLOB, account_key=ACCOUNT_KEY,
                            permission=BlobSasPermissions(read=True),
                            expiry=datetime.now(timezone.utc) + timedelta(hours=1))
    url = BlobClient.from_blob_url(f"{ACCOUNT_URLS[style]}/{CONTAINER}/{BLOB}?{sas}").url
    parts = urlsplit(url)
    return Request("GET", parts.scheme, parts.hostname, parts.port or 443, f"{parts.path}?{parts.query}",
                   (("Host", parts.netloc), ("x-ms-version", "2026-10-06")))


def _bearer_request(style: str) -> Request:
    request = _sdk_request(style, "get_blob_properties", with_cpk=False)
    return request.with_header_map({"Authorization": "Bearer eyJ0eXAiOiJKV1QifQ.e30.c2lnbmF0dXJl"})


@pytest.mark.parametrize("kind", ["sas", "bearer"])
def test_sas_and_bearer_pass_unchecked_and_unchanged(style, kind):
    request = _sas_request(style) if kind == "sas" else _bearer_request(style)
    signature = read_signature(request)
    assert signature.style == kind
    assert signature.access_key_id == ACCOUNT
    if kind == "sas":
        assert signature.signature == request.query_value("sig")
    else:
        assert signature.signature == ""  # the token is a credential: kept out of the signature object
    changed = request.with_header_map(_cpk_headers("x-ms-encryption-", PROXY_KEY))
    far_future = datetime(2100, 1, 1, tzinfo=timezone.utc)
    verify(changed, signature, OTHER_KEY, far_future)
    assert resign(changed, signature, OTHER_KEY, added_headers=("x-ms-encryption-key",)) == (
        changed, signature.signature)


def test_sig_given_twice_is_refused():
    request = _sas_request("host")
    with pytest.raises(SignatureError, match="sig given more than once"):
        read_signature(request.with_target(request.target + "&sig=again"))


def test_signature_object_is_the_documented_shape():
    signature = SharedKeySignature("sharedkey", ACCOUNT, "A" * 43 + "=")
    with pytest.raises(AttributeError):
        signature.style = "sas"
