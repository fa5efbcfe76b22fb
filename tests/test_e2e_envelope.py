"""End to end, envelope encryption for OSS (`envelope: oss-cse`): the real keycourier process between a plain
oss2.Bucket (configured with the proxy and the CA bundle only) and the strict OSS upstream, checked against
Alibaba's own oss2.CryptoBucket talking to the upstream directly, and against `cryptography` on the bytes
the upstream stored. docs/oss.md ("Envelope encryption in the proxy") lists the behaviour tested here."""
from __future__ import annotations

import base64
import hashlib
import os
import re

import oss2
import pytest
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from keycourier.scrub import key_spellings
from tests.conftest import Keycourier
from tests.test_e2e_oss import app  # noqa: F401 (a fixture: this module's keycourier, in the environment)
from tests.test_upstream_oss import session
from tests.upstreams.oss import OssUpstream

ACCESS_KEY, SECRET = "LTAIkeycourierENV01", "oss-envelope-secret-for-tests-01"
MATDESC = {"desc-key": "desc-value"}
DATA = os.urandom(300_003)  # several stream chunks, and a last AES block that is partial
SDK_RANGES = [(0, 0), (5, 40), (4000, None), (len(DATA) - 9, len(DATA) - 1)]  # CryptoBucket takes no suffix range
# Through keycourier: what the provider serves, decrypted. Suffix and open ranges too; a range reaching outside
# the object gets the whole object, as OSS answers by default.
RANGES = {"bytes=0-0": DATA[:1], "bytes=17-4112": DATA[17:4113], "bytes=-7": DATA[-7:],
          "bytes=299990-": DATA[299990:], "bytes=5-99999999": DATA}
BUCKETS = ("cse-rsa", "cse-local", "cse-allow", "cse-described", "open-web")
CSE = "x-oss-meta-client-side-encryption-"
OAEP = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)


def pem_pair(key: rsa.RSAPrivateKey) -> tuple[bytes, bytes]:
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


@pytest.fixture(scope="module")
def masters() -> dict[str, rsa.RSAPrivateKey]:
    """The master key pair, its predecessor (still read: previous_files) and one keycourier never had."""
    return {name: rsa.generate_private_key(65537, 2048) for name in ("current", "previous", "stranger")}


@pytest.fixture(scope="module")
def providers(masters, tmp_path_factory) -> dict[str, oss2.crypto.BaseCryptoProvider]:
    """oss2's own providers: RsaProvider (PKCS#1 v1.5) and LocalRsaProvider (OAEP, reading a key directory)."""
    directory = tmp_path_factory.mktemp("oss2-keys")
    private_pem, public_pem = pem_pair(masters["current"])
    (directory / "master.private_key.pem").write_bytes(private_pem)
    (directory / "master.public_key.pem").write_bytes(public_pem)
    rsa_provider = {name: oss2.RsaProvider({"private_key": pem_pair(key)[0], "public_key": pem_pair(key)[1]})
                    for name, key in masters.items()}
    return {**rsa_provider, "local": oss2.LocalRsaProvider(dir=str(directory), key="master"),
            "described": oss2.RsaProvider({"private_key": private_pem, "public_key": public_pem}, mat_desc=MATDESC)}


@pytest.fixture(scope="module")
def upstream(ca):
    with OssUpstream(ca, {ACCESS_KEY: SECRET}) as server:
        for name in BUCKETS:
            server.create_bucket(name)
        yield server
    assert server.internal_errors == []


@pytest.fixture(scope="module")
def keycourier(upstream, masters, ca_pem, keycourier_confdir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("keycourier-envelope")
    files = {"app.yaml": f"access_key_id: {ACCESS_KEY}\nsecret_access_key: {SECRET}\n".encode(),
             "master.pem": pem_pair(masters["current"])[0], "previous.pem": pem_pair(masters["previous"])[0]}
    for name, content in files.items():
        (workdir / name).write_bytes(content)
        (workdir / name).chmod(0o600)
    policy = f"""version: 1
endpoints:
  - {{host: "127.0.0.1:{upstream.port}", provider: oss}}
keys:
  oss-master: {{file: master.pem, type: rsa, previous_files: [previous.pem]}}
credentials:
  app: {{file: app.yaml}}
rules:
  - {{match: {{provider: oss, bucket: cse-rsa}}, action: encrypt, envelope: oss-cse, key: oss-master}}
  - {{match: {{provider: oss, bucket: cse-local}}, action: encrypt, envelope: oss-cse, key: oss-master, wrap: oaep-sha1}}
  - {{match: {{provider: oss, bucket: cse-allow}}, action: encrypt, envelope: oss-cse, key: oss-master, plaintext_reads: allow}}
  - {{match: {{provider: oss, bucket: cse-described}}, action: encrypt, envelope: oss-cse, key: oss-master, matdesc: {{desc-key: desc-value}}}}
  - {{match: {{provider: oss, bucket: "open-*"}}, action: passthrough}}
  - {{match: {{provider: "*"}}, action: deny}}
"""
    proxy = Keycourier(workdir, keycourier_confdir, policy, upstream_ca=ca_pem)
    yield proxy
    proxy.stop()


def through(upstream, name: str, auth=None) -> oss2.Bucket:
    """A plain oss2.Bucket, as a legacy application has it: through keycourier by its environment."""
    return oss2.Bucket(auth or oss2.Auth(ACCESS_KEY, SECRET), upstream.endpoint_url, name)


def direct(upstream, ca_pem, name: str, provider=None):
    """Straight to the upstream, no keycourier: a CryptoBucket with `provider`, else a plain Bucket."""
    auth = oss2.Auth(ACCESS_KEY, SECRET)
    if provider is None:
        return oss2.Bucket(auth, upstream.endpoint_url, name, session=session(ca_pem))
    return oss2.CryptoBucket(auth, upstream.endpoint_url, name, crypto_provider=provider, session=session(ca_pem))


def stored_material(upstream, bucket: str, key: str, master: rsa.RSAPrivateKey) -> tuple[bytes, bytes]:
    """The object's data key and IV, unwrapped from its stored metadata with `cryptography` alone."""
    metadata = upstream.stored(bucket, key).metadata
    wrap = OAEP if "OAEP" in metadata["client-side-encryption-wrap-alg"] else padding.PKCS1v15()
    return tuple(master.decrypt(base64.b64decode(metadata[f"client-side-encryption-{name}"]), wrap)
                 for name in ("key", "start"))


def decrypted(upstream, bucket: str, key: str, master: rsa.RSAPrivateKey) -> bytes:
    data_key, iv = stored_material(upstream, bucket, key, master)
    return Cipher(algorithms.AES(data_key), modes.CTR(iv)).decryptor().update(upstream.stored_bytes(bucket, key))


def refused(call) -> oss2.exceptions.ServerError:
    with pytest.raises(oss2.exceptions.ServerError) as raised:
        call()
    return raised.value


# --- interop, both directions ----------------------------------------------------------------------

@pytest.mark.parametrize("bucket, provider", [("cse-rsa", "current"), ("cse-local", "local")])
def test_what_a_plain_bucket_writes_through_keycourier_crypto_bucket_reads(app, upstream, ca_pem, masters, providers,
                                                                          bucket, provider):
    result = through(upstream, bucket).put_object("by-proxy.bin", DATA)  # oss2 checks the CRC it gets, if any
    assert result.status == 200 and upstream.stored_bytes(bucket, "by-proxy.bin") != DATA
    assert decrypted(upstream, bucket, "by-proxy.bin", masters["current"]) == DATA

    sdk = direct(upstream, ca_pem, bucket, providers[provider])
    assert sdk.get_object("by-proxy.bin").read() == DATA
    for first, last in SDK_RANGES:
        assert sdk.get_object("by-proxy.bin", byte_range=(first, last)).read() == DATA[first:None if last is None else last + 1]


@pytest.mark.parametrize("bucket, provider", [("cse-rsa", "current"), ("cse-local", "local")])
def test_what_crypto_bucket_writes_a_plain_bucket_reads_through_keycourier(app, upstream, ca_pem, providers, tmp_path,
                                                                          bucket, provider):
    direct(upstream, ca_pem, bucket, providers[provider]).put_object("by-sdk.bin", DATA)
    plain = through(upstream, bucket)
    whole = plain.get_object("by-sdk.bin")
    assert whole.read() == DATA
    for header, expected in RANGES.items():
        got = plain.get_object("by-sdk.bin", headers={"Range": header})
        assert got.read() == expected, header
    plain.get_object_to_file("by-sdk.bin", str(tmp_path / "copy"))  # checks the CRC when it has one
    assert (tmp_path / "copy").read_bytes() == DATA


def test_the_application_sees_the_plaintexts_headers(app, upstream):
    md5 = base64.b64encode(hashlib.md5(DATA).digest()).decode()
    upstream.clear_requests()
    put = through(upstream, "cse-rsa").put_object("md5.bin", DATA, headers={"Content-MD5": md5})
    sent = {name.lower(): value for name, value in upstream.requests[-1].headers}
    assert "content-md5" not in sent and sent[CSE + "unencrypted-content-md5"] == md5  # moved, as oss2 does
    assert sent[CSE + "unencrypted-content-length"] == str(len(DATA))
    assert put.headers["Content-MD5"] == md5 and "x-oss-hash-crc64ecma" not in put.headers

    head = through(upstream, "cse-rsa").head_object("md5.bin")
    assert head.content_length == len(DATA) and head.headers["Content-MD5"] == md5
    assert head.server_crc is None and not any(name.lower().startswith(CSE) for name in head.headers)
    assert through(upstream, "cse-rsa").get_object("md5.bin").headers["Content-MD5"] == md5


def test_a_content_md5_that_does_not_match_the_body_is_refused(app, upstream):
    wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    error = refused(lambda: through(upstream, "cse-rsa").put_object("bad-md5.bin", DATA, headers={"Content-MD5": wrong}))
    assert (error.status, error.code) == (400, "InvalidDigest") and "does not match" in error.message
    error = refused(lambda: through(upstream, "cse-rsa").put_object("bad-md5.bin", DATA, headers={"Content-MD5": "x"}))
    assert (error.status, error.code) == (400, "InvalidDigest")


def test_v4_signed_requests_are_encrypted_and_re_signed(app, upstream, masters):
    v4 = oss2.Bucket(oss2.AuthV4(ACCESS_KEY, SECRET), upstream.endpoint_url, "cse-rsa", region=upstream.region)
    v4.put_object("v4.bin", DATA[:1000], headers={"Content-MD5": base64.b64encode(hashlib.md5(DATA[:1000]).digest()).decode()})
    assert decrypted(upstream, "cse-rsa", "v4.bin", masters["current"]) == DATA[:1000]
    assert v4.get_object("v4.bin", byte_range=(3, 20)).read() == DATA[3:21]


def test_an_empty_object_round_trips(app, upstream, ca_pem, providers):
    through(upstream, "cse-rsa").put_object("empty", b"")
    assert direct(upstream, ca_pem, "cse-rsa", providers["current"]).get_object("empty").read() == b""
    assert through(upstream, "cse-rsa").get_object("empty").read() == b""


# --- master key versions -----------------------------------------------------------------------------

def test_objects_under_the_previous_master_key_are_read_and_new_ones_use_the_current(app, upstream, ca_pem, masters,
                                                                                    providers):
    direct(upstream, ca_pem, "cse-rsa", providers["previous"]).put_object("old.bin", DATA)
    assert through(upstream, "cse-rsa").get_object("old.bin", byte_range=(100, 199)).read() == DATA[100:200]
    through(upstream, "cse-rsa").put_object("old.bin", DATA)  # rewritten: under the current key
    assert decrypted(upstream, "cse-rsa", "old.bin", masters["current"]) == DATA


def test_a_wrong_key_and_a_tampered_key_are_answered_alike_never_with_bytes(app, upstream, ca_pem, masters,
                                                                           providers):
    direct(upstream, ca_pem, "cse-rsa", providers["stranger"]).put_object("stranger.bin", DATA)
    direct(upstream, ca_pem, "cse-rsa", providers["current"]).put_object("tampered.bin", DATA)
    secrets = stored_material(upstream, "cse-rsa", "tampered.bin", masters["current"])
    stored = upstream.stored("cse-rsa", "tampered.bin")
    wrapped = bytearray(base64.b64decode(stored.metadata["client-side-encryption-key"]))
    wrapped[100] ^= 1
    stored.metadata["client-side-encryption-key"] = base64.b64encode(wrapped).decode()
    answers = []
    for name in ("stranger.bin", "tampered.bin"):
        response = raw_get(app, upstream, "cse-rsa", name)
        assert response.status_code == 403 and DATA[:64] not in response.content
        assert not any(spelling in response.content for secret in secrets for spelling in key_spellings(secret))
        answers.append((response.content, response.headers["x-keycourier-error"]))
    assert answers[0] == answers[1] and "unwraps" in answers[0][1]
    error = refused(lambda: through(upstream, "cse-rsa").head_object("stranger.bin"))
    assert error.status == 403 and "unwraps" in error.message  # from x-oss-err: a HEAD answer has no body


def raw_get(app, upstream, bucket: str, key: str) -> requests.Response:
    """A signed GET through keycourier, answer as it came (oss2 would turn it into an exception)."""
    url = f"{upstream.endpoint_url}/{bucket}/{key}"
    request = oss2.http.Request("GET", url, headers=oss2.CaseInsensitiveDict({"date": oss2.utils.http_date()}))
    oss2.Auth(ACCESS_KEY, SECRET)._sign_request(request, bucket, key)
    return requests.get(url, headers=dict(request.headers), proxies={"https": app.url}, verify=str(app.ca_cert))


@pytest.mark.parametrize("header, value, words", [
    (CSE + "cek-alg", "AES/GCM/NoPadding", "keycourier reads AES/CTR/NoPadding"),
    (CSE + "start", None, "lacks x-oss-meta-client-side-encryption-start"),
])
def test_damaged_metadata_is_a_clear_refusal(app, upstream, ca_pem, providers, header, value, words):
    direct(upstream, ca_pem, "cse-rsa", providers["current"]).put_object("damaged.bin", DATA)
    metadata = upstream.stored("cse-rsa", "damaged.bin").metadata
    name = header.removeprefix("x-oss-meta-")
    metadata.pop(name) if value is None else metadata.update({name: value})
    error = refused(lambda: through(upstream, "cse-rsa").get_object("damaged.bin"))
    assert error.status == 403 and words in error.message


def test_the_rules_material_description_is_written_and_must_be_the_objects(app, upstream, ca_pem, providers):
    through(upstream, "cse-described").put_object("described.bin", DATA)
    assert direct(upstream, ca_pem, "cse-described", providers["described"]).get_object("described.bin").read() == DATA
    with pytest.raises(oss2.exceptions.ClientError, match="material description"):
        direct(upstream, ca_pem, "cse-described", providers["current"]).get_object("described.bin")
    direct(upstream, ca_pem, "cse-described", providers["current"]).put_object("undescribed.bin", DATA)
    error = refused(lambda: through(upstream, "cse-described").get_object("undescribed.bin"))
    assert error.status == 403 and "material description" in error.message


# --- plaintext objects -------------------------------------------------------------------------------

def test_plaintext_objects_follow_plaintext_reads(app, upstream, ca_pem):
    for bucket in ("cse-rsa", "cse-allow"):
        direct(upstream, ca_pem, bucket).put_object("legacy.txt", b"written before the rule")
    error = refused(lambda: through(upstream, "cse-rsa").get_object("legacy.txt"))
    assert error.status == 403 and "plaintext_reads: allow" in error.message
    assert refused(lambda: through(upstream, "cse-rsa").head_object("legacy.txt")).status == 403
    allowed = through(upstream, "cse-allow").get_object("legacy.txt")
    assert allowed.read() == b"written before the rule" and allowed.server_crc is not None  # untouched


# --- refusals ------------------------------------------------------------------------------------------

def test_multipart_uploads_are_refused_naming_the_threshold(app, upstream, tmp_path):
    bucket = through(upstream, "cse-rsa")
    upstream.clear_requests()
    error = refused(lambda: bucket.init_multipart_upload("big.bin"))
    assert error.status == 403 and "multipart_threshold" in error.message
    path = tmp_path / "big.bin"
    path.write_bytes(DATA)
    error = refused(lambda: oss2.resumable_upload(bucket, "big.bin", str(path), multipart_threshold=100 * 1024,
                                                  store=oss2.ResumableStore(root=str(tmp_path))))
    assert "multipart_threshold" in error.message
    oss2.resumable_upload(bucket, "big.bin", str(path), multipart_threshold=len(DATA) + 1)  # the fix
    assert through(upstream, "cse-rsa").get_object("big.bin").read() == DATA
    assert not any("uploads" in r.path for r in upstream.requests)


def test_operations_that_cannot_keep_objects_encrypted_are_refused(app, upstream):
    bucket = through(upstream, "cse-rsa")
    bucket.put_object("source.bin", DATA)
    upstream.clear_requests()
    calls = {
        "AppendObject": lambda: bucket.append_object("log.txt", 0, b"line"),
        "x-oss-process": lambda: bucket.get_object("source.bin", process="image/resize,w_100"),
        "SelectObject": lambda: bucket.select_object("source.bin", "select * from ossobject"),
        "REPLACE": lambda: bucket.copy_object("cse-rsa", "source.bin", "copy.bin",
                                              headers={"x-oss-metadata-directive": "REPLACE"}),
        "into plaintext": lambda: through(upstream, "open-web").copy_object("cse-rsa", "source.bin", "copy.bin"),
        "from plaintext": lambda: bucket.copy_object("open-web", "page.html", "copy.bin"),
        "another description": lambda: through(upstream, "cse-described").copy_object("cse-rsa", "source.bin", "copy.bin"),
    }
    for what, call in calls.items():
        error = refused(call)
        assert error.status in (400, 403) and "keycourier" in error.message, what
    upload = through(upstream, "open-web").init_multipart_upload("parts.bin").upload_id
    upstream.clear_requests()
    error = refused(lambda: through(upstream, "open-web").upload_part_copy("cse-rsa", "source.bin", (0, 102399),
                                                                           "parts.bin", upload, 1))
    assert error.status == 403 and "ciphertext" in error.message
    assert upstream.requests == []


def test_a_browser_form_upload_is_refused(app, upstream):
    form = requests.post(f"{upstream.endpoint_url}/cse-rsa", files={"key": (None, "form.txt"), "file": b"plaintext"},
                         proxies={"https": app.url}, verify=str(app.ca_cert))
    assert form.status_code == 403 and "PostObject" in form.headers["x-keycourier-error"]


def test_an_application_encrypting_itself_is_told_to_use_passthrough(app, upstream, providers):
    sdk = oss2.CryptoBucket(oss2.Auth(ACCESS_KEY, SECRET), upstream.endpoint_url, "cse-rsa",
                            crypto_provider=providers["current"])
    error = refused(lambda: sdk.put_object("double.bin", DATA))
    assert error.status == 400 and "passthrough" in error.message


def test_copies_keep_the_envelope(app, upstream, ca_pem, providers):
    bucket = through(upstream, "cse-rsa")
    bucket.put_object("original.bin", DATA)
    bucket.copy_object("cse-rsa", "original.bin", "copied.bin")
    assert bucket.get_object("copied.bin").read() == DATA
    assert direct(upstream, ca_pem, "cse-rsa", providers["current"]).get_object("copied.bin").read() == DATA


# --- nothing leaks ---------------------------------------------------------------------------------------

def test_data_keys_appear_in_no_log_flow_or_metric(app, upstream, masters):
    bucket = through(upstream, "cse-rsa")
    bucket.put_object("leak.bin", DATA)
    assert bucket.get_object("leak.bin", byte_range=(10, 20)).read() == DATA[10:21]
    refused(lambda: bucket.append_object("leak.log", 0, b"x"))
    data_key, iv = stored_material(upstream, "cse-rsa", "leak.bin", masters["current"])
    app.wait_for_log("op=AppendObject")
    _, metrics = app.scrape()
    for where in (app.flows_path.read_bytes(), app.log().encode(), metrics.encode()):
        for secret in (data_key, iv):
            assert not any(spelling in where for spelling in key_spellings(secret))
    assert re.search(r"op=PutObject rule=rule\d+ action=encrypt key=oss-master file fingerprint=\S+", app.log())
