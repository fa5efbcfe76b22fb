"""Envelope rules without a proxy: the policy fields, RSA master keys from files and Vault, and what the pipeline
and keycourier.envelope_flow make of requests and answers. tests/test_e2e_envelope.py drives the real proxy."""
import base64
import hashlib
import textwrap
from datetime import datetime, timezone
from email.utils import format_datetime

import oss2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keycourier import envelope, envelope_flow
from keycourier.destination import Destination, EndpointAddresses
from keycourier.keys import KeyUnavailable, Secrets, blocking
from keycourier.message import Request
from keycourier.pipeline import Forward, Refuse, handle_request
from keycourier.policy import PolicyError, parse_policy
from keycourier.versions import KeyVersions
from tests.upstreams.vault import VaultServer

ACCESS_KEY, SECRET = "LTAIunitENVELOPE", "unit-envelope-secret"
NOW = datetime.now(timezone.utc)
HOST = "127.0.0.1:9443"
POLICY = textwrap.dedent("""\
    version: 1
    endpoints:
      - {host: "127.0.0.1:9443", provider: oss}
    keys:
      master: {file: master.pem, type: rsa, previous_files: [old.pem]}
      aes: {file: aes.key}
    credentials:
      app: {file: app.yaml}
    rules:
      - {match: {provider: oss, bucket: cse}, action: encrypt, envelope: oss-cse, key: master, matdesc: {a: b}}
      - {match: {provider: oss, bucket: open}, action: passthrough}
""")


def pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(65537, 2048) for _ in range(3)]


@pytest.fixture
def policy(tmp_path, rsa_keys):
    files = {"master.pem": pem(rsa_keys[0]), "old.pem": pem(rsa_keys[1]), "aes.key": base64.b64encode(bytes(32)),
             "app.yaml": f"access_key_id: {ACCESS_KEY}\nsecret_access_key: {SECRET}\n".encode()}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        (tmp_path / name).chmod(0o600)
    return parse_policy(POLICY, base_dir=tmp_path)


# --- the policy -----------------------------------------------------------------------------------

def test_an_envelope_rule_and_an_rsa_key_load():
    policy = parse_policy(POLICY)
    rule = policy.rules[0]
    assert (rule.envelope, rule.key, rule.wrap, rule.matdesc) == ("oss-cse", "master", "pkcs1v15", (("a", "b"),))
    assert policy.keys["master"].key_type == "rsa" and policy.keys["aes"].key_type == "aes256"


@pytest.mark.parametrize("edit, line, reason", [
    (("provider: oss, bucket: cse", "provider: s3, bucket: cse"), 10, "the rule must match provider: oss"),
    (("envelope: oss-cse, key: master", "envelope: oss-cse, key: aes"), 10, "must be an RSA key pair (type: rsa)"),
    (("envelope: oss-cse, key: master", "envelope: oss-cse"), 10, "an envelope rule needs a key"),
    (("envelope: oss-cse", "envelope: s3-cse"), 10, "envelope must be one of oss-cse"),
    (("matdesc: {a: b}", "wrap: rsa-oaep"), 10, "wrap must be one of pkcs1v15, oaep-sha1"),
    (("matdesc: {a: b}", "matdesc: [a]"), 10, "matdesc must map names to strings"),
    (("matdesc: {a: b}", "oss_sse: KMS"), 10, "an envelope rule takes no oss_sse"),
    (("action: passthrough}", "action: passthrough, envelope: oss-cse}"), 11, "a passthrough rule takes no envelope"),
    (("envelope: oss-cse, key: master, matdesc: {a: b}", "oss_sse: KMS, wrap: oaep-sha1"), 10,
     "wrap goes with envelope: oss-cse"),
    (("provider: oss, bucket: open}, action: passthrough", "provider: azure}, action: encrypt, key: master"), 11,
     "key 'master' is an RSA key pair: only envelope rules take it"),
    (("type: rsa", "type: ec"), 5, "key type must be one of aes256, rsa, not 'ec'"),
])
def test_envelope_errors_name_the_line(edit, line, reason):
    with pytest.raises(PolicyError) as raised:
        parse_policy(POLICY.replace(*edit), source="p.yaml")
    assert raised.value.line == line and reason in raised.value.reason


# --- master keys --------------------------------------------------------------------------------------

def public_sha256(key: rsa.RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def test_file_master_keys_load_with_their_previous_files(policy, rsa_keys):
    secrets = Secrets()
    keys = blocking(lambda: secrets.read_keys(policy, policy.keys["master"]))
    assert [key.version for key in keys] == ["file", "previous-1"]
    assert [key.sha256_b64 for key in keys] == [public_sha256(rsa_keys[0]), public_sha256(rsa_keys[1])]
    assert all(isinstance(key.master, envelope.MasterKey) for key in keys)
    assert "PRIVATE" not in repr(keys) and "private_key" not in repr(keys)


def test_a_master_key_that_is_no_pem_is_named_never_shown(policy, tmp_path):
    (tmp_path / "master.pem").write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n")
    secrets = Secrets()
    with pytest.raises(KeyUnavailable) as raised:
        blocking(lambda: secrets.key(policy, policy.keys["master"]))
    assert "'master' is not a PEM private key" in str(raised.value) and "c2VjcmV0" not in str(raised.value)


def test_vault_master_keys_are_read_back_to_min_version(ca, ca_pem, tmp_path, rsa_keys, monkeypatch):
    with VaultServer(ca) as vault:
        for key in rsa_keys:
            vault.kv_put("keycourier/oss-master", {"pem": pem(key).decode()})
        monkeypatch.setenv("VAULT_TOKEN", vault.root_token)
        policy = parse_policy(POLICY.replace("{file: master.pem, type: rsa, previous_files: [old.pem]}", (
            "{vault: {path: secret/data/keycourier/oss-master, field: pem, min_version: 2}, type: rsa}")).replace(
            "version: 1\n", f'version: 1\nvault: {{addr: "{vault.addr}", ca_cert: "{ca_pem}"}}\n'), base_dir=tmp_path)
        secrets = Secrets()
        keys = blocking(lambda: secrets.read_keys(policy, policy.keys["master"]))
    assert [(key.version, key.sha256_b64) for key in keys] == [("v3", public_sha256(rsa_keys[2])),
                                                               ("v2", public_sha256(rsa_keys[1]))]


# --- requests -------------------------------------------------------------------------------------------

def oss_request(method: str, path: str, headers: dict[str, str] | None = None) -> Request:
    """A request signed with oss2's own V1 signer, as an oss2 application sends it."""
    headers = {"host": HOST, "date": format_datetime(NOW, usegmt=True), **(headers or {})}
    bucket, _, key = path.lstrip("/").partition("?")[0].partition("/")
    sdk = oss2.http.Request(method, f"https://{HOST}{path}", headers=oss2.CaseInsensitiveDict(headers))
    oss2.Auth(ACCESS_KEY, SECRET)._sign_request(sdk, bucket, key)
    return Request(method, "https", "127.0.0.1", 9443, path,
                   tuple((name, value) for name, value in sdk.headers.items() if value is not None))


def run(policy, request: Request) -> Forward | Refuse:
    secrets = Secrets()
    return blocking(lambda: handle_request(request, client_tls=True, destination=Destination.of("127.0.0.1", 9443),
                                           policy=policy, addresses=EndpointAddresses(resolve=lambda host: []),
                                           secrets=secrets, versions=KeyVersions(), now=NOW))


def test_a_put_gets_the_metadata_and_is_re_signed_without_content_md5(policy, rsa_keys):
    md5 = base64.b64encode(hashlib.md5(b"hello").digest()).decode()
    request = oss_request("PUT", "/cse/a.txt", {"content-length": "5", "content-md5": md5})
    forward = run(policy, request)
    sent = dict(forward.request.headers)
    assert "content-md5" not in {name.lower() for name in sent}
    assert sent[envelope.UNENCRYPTED_MD5_HEADER] == md5 and sent[envelope.UNENCRYPTED_LENGTH_HEADER] == "5"
    assert sent[envelope.MATDESC_HEADER] == '{"a": "b"}' and sent[envelope.WRAP_ALG_HEADER] == "RSA/NONE/PKCS1Padding"
    assert sent[envelope_flow.MASTER_KEY_HEADER] == public_sha256(rsa_keys[0])
    assert forward.request.header("authorization") != request.header("authorization")
    material = envelope.parse_metadata(sent, [envelope.MasterKey("m", rsa_keys[0], matdesc={"a": "b"})])
    assert forward.body(b"hel") + forward.body(b"lo") + forward.body(b"") == material.cipher()(b"hello")
    assert forward.audit.key_version == "file" and forward.audit.key_fingerprint == public_sha256(rsa_keys[0])


def test_a_chunked_put_has_no_plaintext_length_and_its_digest_is_checked_over_every_chunk(policy):
    md5 = base64.b64encode(hashlib.md5(b"hello").digest()).decode()
    forward = run(policy, oss_request("PUT", "/cse/b.txt", {"transfer-encoding": "chunked", "content-md5": md5}))
    assert envelope.UNENCRYPTED_LENGTH_HEADER not in dict(forward.request.headers)
    forward.body(b"he")
    assert forward.envelope.respond(200, []).status == 400  # an answer before the body ended checks nothing
    forward.body(b"llo")
    forward.body(b"")
    assert forward.envelope.respond(200, [("x-oss-hash-crc64ecma", "1"), ("Content-MD5", "x")]) == (
        200, [("Content-MD5", md5)], None, None)


def test_an_empty_put_with_a_wrong_digest_is_refused_before_it_is_sent(policy):
    wrong = base64.b64encode(hashlib.md5(b"x").digest()).decode()
    refused = run(policy, oss_request("PUT", "/cse/empty", {"content-length": "0", "content-md5": wrong}))
    assert isinstance(refused, Refuse) and refused.refusal.code == "InvalidDigest"


@pytest.mark.parametrize("method, path, headers, status, words", [
    ("POST", "/cse/log?append&position=0", {}, 403, "refuses AppendObject"),
    ("POST", "/cse/big?uploads", {}, 403, "multipart_threshold"),
    ("PUT", "/cse/big?partNumber=1&uploadId=u", {}, 403, "multipart_threshold"),
    ("POST", "/cse/big?uploadId=u", {}, 403, "multipart_threshold"),
    ("GET", "/cse/a.jpg?x-oss-process=image/resize,w_100", {}, 403, "x-oss-process"),
    ("POST", "/cse/a.csv?x-oss-process=csv/select", {}, 403, "SelectObject"),
    ("POST", "/cse", {}, 403, "PostObject"),
    ("PUT", "/cse/a", {"x-oss-meta-client-side-encryption-key": "AAAA"}, 400, "passthrough rule"),
    ("PUT", "/cse/b", {"x-oss-copy-source": "/cse/a", "x-oss-metadata-directive": "REPLACE"}, 400, "COPY"),
    ("PUT", "/cse/b", {"x-oss-copy-source": "/open/a"}, 403, "unreadable or plaintext"),
    ("PUT", "/open/b", {"x-oss-copy-source": "/cse/a"}, 403, "no reader of it decrypts"),
    ("PUT", "/open/b?partNumber=1&uploadId=u", {"x-oss-copy-source": "/cse/a"}, 403, "no reader of it decrypts"),
])
def test_what_cannot_stay_encrypted_is_refused(policy, method, path, headers, status, words):
    refused = run(policy, oss_request(method, path, headers))
    assert isinstance(refused, Refuse), refused
    assert refused.refusal.status == status and words in refused.refusal.message


def test_a_copy_within_the_rule_and_other_requests_go_unchanged(policy):
    for request in (oss_request("PUT", "/cse/b", {"x-oss-copy-source": "/cse/a"}), oss_request("DELETE", "/cse/a"),
                    oss_request("GET", "/cse/?prefix=a")):
        assert run(policy, request).request == request


# --- answers ------------------------------------------------------------------------------------------

@pytest.fixture
def material(rsa_keys):
    return envelope.new_material(envelope.MasterKey("m", rsa_keys[1], matdesc={"a": "b"}))


def read(policy, headers=None, method="GET") -> envelope_flow.Exchange:
    forward = run(policy, oss_request(method, "/cse/a", {"accept-encoding": "gzip", **(headers or {})}))
    assert "accept-encoding" not in {name.lower() for name, _ in forward.request.headers}
    return forward.envelope


def stored(material, **extra) -> list[tuple[str, str]]:
    metadata = envelope.render_metadata(material, 100, "bWQ1")
    return [*metadata.items(), ("x-oss-hash-crc64ecma", "7"), ("Content-MD5", "ciphertext"), *extra.items()]


def test_an_answer_is_decrypted_from_where_its_range_starts(policy, material):
    plaintext = bytes(range(100))
    reply = read(policy, {"range": "bytes=-30"}).respond(206, stored(material, **{"Content-Range": "bytes 70-99/100"}))
    assert reply.body(material.cipher()(plaintext)[70:]) == plaintext[70:]
    assert dict(reply.headers) == {"Content-Range": "bytes 70-99/100"}  # no CRC, no envelope, no MD5 of the whole


def test_the_master_key_header_picks_the_version_and_a_wrong_one_falls_back(policy, material, rsa_keys):
    for hint in (public_sha256(rsa_keys[1]), public_sha256(rsa_keys[2])):
        reply = read(policy).respond(200, stored(material, **{envelope_flow.MASTER_KEY_HEADER: hint}))
        assert reply.status == 200 and reply.error is None and ("Content-MD5", "bWQ1") in reply.headers
    reply = read(policy).respond(200, stored(material, **{envelope_flow.MASTER_KEY_HEADER: public_sha256(rsa_keys[0])}))
    assert reply.status == 403 and "'master file'" in reply.error and "'master previous-1'" not in reply.error


@pytest.mark.parametrize("status, headers", [(304, []), (404, [("Content-Length", "120")])])
def test_answers_without_an_object_pass_unchanged(policy, status, headers):
    assert read(policy).respond(status, headers) == (status, headers, None, None)


def test_refusals_have_a_body_unless_the_answer_has_none(policy, material):
    bodiless = read(policy, method="HEAD").respond(200, [(envelope.KEY_HEADER, "AAAA")])
    assert bodiless.status == 403 and dict(bodiless.headers)["Content-Length"] == "0"
    assert b"<Code>AccessDenied</Code>" in base64.b64decode(dict(bodiless.headers)["x-oss-err"])
    odd_range = read(policy).respond(206, stored(material, **{"Content-Range": "bytes */100"}))
    body = odd_range.body(b"ciphertext") + odd_range.body(b"more") + odd_range.body(b"")
    assert odd_range.status == 502 and dict(odd_range.headers)["Content-Length"] == str(len(body))
    assert b"cannot place" in body
