"""Reads across key rotation, without a network: which keys a read may need, in which order, how the
provider's answers are read, how far the tries go, and what is remembered."""
import base64

import pytest

from keycourier.dialects import ObjectRef, azure, s3
from keycourier.fallback import Parked, next_attempt
from keycourier.keys import Secrets, blocking
from keycourier.policy import PolicyError, parse_policy
from keycourier.versions import PLAINTEXT, KeyChoice, KeyVersions
from tests.test_pipeline import run, signed

KEYS = [bytes([n]) * 32 for n in range(3)]


@pytest.fixture
def policy(tmp_path):
    for n, key in enumerate(KEYS):
        (tmp_path / f"k{n}.key").write_text(base64.b64encode(key).decode())
        (tmp_path / f"k{n}.key").chmod(0o600)
    (tmp_path / "app.yaml").write_text("access_key_id: AKIDEXAMPLE\nsecret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n")
    (tmp_path / "app.yaml").chmod(0o600)
    return parse_policy("""
version: 1
endpoints: [{host: "127.0.0.1:9000", provider: s3}]
keys:
  rotated: {file: k2.key, previous_files: [k1.key, k0.key]}
  single: {file: k0.key}
credentials: {app: {file: app.yaml, access_key_id: AKIDEXAMPLE}}
rules:
  - {match: {provider: s3, bucket: "rot-*"}, action: encrypt, key: rotated}
  - {match: {provider: s3, bucket: "one-*"}, action: encrypt, key: single}
  - {match: {provider: s3, bucket: "adopt-*"}, action: encrypt, key: single, plaintext_reads: allow}
""", base_dir=tmp_path)


def tried_versions(decision):
    return [attempt.choice.version for attempt in decision.attempts]


def test_a_file_keys_previous_files_are_read_keys_newest_first(policy):
    secrets = Secrets()
    keys = blocking(lambda: secrets.read_keys(policy, policy.keys["rotated"]))
    assert [(k.version, k.material) for k in keys] == [("file", KEYS[2]), ("previous-1", KEYS[1]), ("previous-2", KEYS[0])]


def test_an_unknown_object_is_tried_with_the_newest_version_first_then_older(policy):
    decision = run(policy, signed("GET", "/rot-a/x"))
    assert tried_versions(decision) == ["file", "previous-1", "previous-2"]
    assert decision.request is decision.attempts[0].request
    sent_keys = [a.request.header("x-amz-server-side-encryption-customer-key") for a in decision.attempts]
    assert sent_keys == [base64.b64encode(key).decode() for key in reversed(KEYS)]


def test_a_remembered_version_is_tried_first_and_the_write_version_goes_straight(policy):
    versions = KeyVersions()
    versions.remember(KeyChoice(ObjectRef("rot-a", "x"), "rotated", "previous-2"))
    assert tried_versions(run(policy, signed("HEAD", "/rot-a/x"), versions=versions)) == ["previous-2", "file", "previous-1"]
    versions.remember(KeyChoice(ObjectRef("rot-a", "x"), "rotated", "file"))
    assert run(policy, signed("HEAD", "/rot-a/x"), versions=versions).attempts == ()


def test_a_single_version_goes_straight_unless_plaintext_reads_are_allowed(policy):
    assert run(policy, signed("GET", "/one-a/x")).attempts == ()
    assert tried_versions(run(policy, signed("GET", "/adopt-a/x"))) == ["file", None]


def test_writes_are_remembered_under_the_write_version_and_bodies_are_never_retried(policy):
    decision = run(policy, signed("PUT", "/rot-a/x"))
    assert decision.attempts == () and decision.written == KeyChoice(ObjectRef("rot-a", "x"), "rotated", "file")


def test_a_copy_tries_its_sources_versions(policy):
    decision = run(policy, signed("PUT", "/one-b/y", headers={"x-amz-copy-source": "/rot-a/x"}))
    assert tried_versions(decision) == ["file", "previous-1", "previous-2"]
    assert decision.read.source and decision.written.version == "file"


@pytest.mark.parametrize("dialect, status, headers, body, source, outcome", [
    (s3, 403, {}, b"<Code>AccessDenied</Code><Message>Requests specifying Server Side Encryption with Customer "
                  b"provided keys must provide the correct secret key.</Message>", False, "wrong_key"),
    (s3, 403, {}, b"", False, "wrong_key"),  # a HEAD: no body to tell a denial from a wrong key
    (s3, 403, {}, b"<Code>AccessDenied</Code><Message>User: arn:aws:iam::1:user/x is not authorized</Message>", False, "served"),
    (s3, 403, {}, b"<Code>AccessDenied</Code><Message>Access Denied</Message>", True, "wrong_key"),
    (s3, 400, {}, b"<Message>The encryption parameters are not applicable to this object.</Message>", False, "plaintext"),
    (s3, 400, {}, b"<Code>InvalidArgument</Code>", False, "served"),
    (s3, 200, {}, b"", False, "served"),
    (azure, 409, {"x-ms-error-code": "BlobCustomerSpecifiedEncryptionMismatch"}, b"", False, "wrong_key"),
    (azure, 409, {"x-ms-error-code": "BlobDoesNotUseCustomerSpecifiedEncryption"}, b"", False, "plaintext"),
    (azure, 409, {"x-ms-error-code": "CannotVerifyCopySource"}, b"The given customer specified encryption does not match", True, "wrong_key"),
    (azure, 409, {"x-ms-error-code": "BlobUsesCustomerSpecifiedEncryption"}, b"", False, "served"),
    (azure, 403, {"x-ms-error-code": "AuthorizationPermissionMismatch"}, b"", False, "served"),
])
def test_provider_answers_are_read_as_the_providers_document_them(dialect, status, headers, body, source, outcome):
    assert dialect.read_outcome(status, headers, body, source=source) == outcome


def test_tries_are_bounded_and_a_plaintext_answer_jumps_to_the_keyless_try():
    parked = Parked(requests=["v3", "v2", "v1", "none"], plaintext_at=3, judge=None)
    assert [next_attempt(parked, n, "wrong_key") for n in range(3)] == [1, 2, None]  # then the provider's answer
    assert next_attempt(parked, 0, "plaintext") == 3 and next_attempt(parked, 3, "plaintext") is None
    assert next_attempt(parked, 1, "served") is None
    assert next_attempt(Parked(["v2", "v1"], None, None), 0, "plaintext") is None  # plaintext_reads: deny


def test_the_memory_is_a_bounded_lru():
    versions = KeyVersions(size=3)
    for n in range(4):
        versions.remember(KeyChoice(ObjectRef("b", f"o{n}"), "k", f"v{n}"))
    assert len(versions) == 3 and versions.recall(ObjectRef("b", "o0"), "k") is None
    assert versions.recall(ObjectRef("b", "o1"), "k") == "v1"  # recalled: now the most recent
    versions.remember(KeyChoice(ObjectRef("b", "o4"), "k", None))
    assert versions.recall(ObjectRef("b", "o1"), "k") == "v1" and versions.recall(ObjectRef("b", "o2"), "k") is None
    assert versions.recall(ObjectRef("b", "o4"), "k") == PLAINTEXT and versions.recall(ObjectRef("b", "o4"), "other") is None


@pytest.mark.parametrize("key, reason", [
    ("{vault: {path: secret/data/k, version: 2, min_version: 3}}", "min_version 3 is newer than the pinned version 2"),
    ("{vault: {path: secret/data/k, min_version: 0}}", "vault min_version must be a positive integer"),
    ("{vault: {path: secret/data/k}, previous_files: [old.key]}", "previous_files goes with a file key"),
    ("{file: k.key, previous_files: old.key}", "previous_files must be a list of key file paths"),
])
def test_version_options_are_validated(key, reason):
    with pytest.raises(PolicyError, match=reason):
        parse_policy(f"version: 1\nendpoints: []\nkeys:\n  k: {key}\nrules: []\n")


def test_plaintext_reads_is_an_encrypt_rules_option():
    with pytest.raises(PolicyError, match="plaintext_reads must be deny or allow"):
        parse_policy("version: 1\nendpoints: []\nkeys: {k: {file: k.key}}\n"
                     "rules: [{match: {provider: s3}, action: encrypt, key: k, plaintext_reads: yes}]\n")
    with pytest.raises(PolicyError, match="a passthrough rule takes no plaintext_reads"):
        parse_policy("version: 1\nendpoints: []\nrules: [{match: {provider: s3}, action: passthrough, plaintext_reads: allow}]\n")
