import os
import re
import shutil
import textwrap
from pathlib import Path

import pytest

from keycourier.policy import PolicyError, PolicyFile, load_policy, parse_policy

REPO = Path(__file__).resolve().parent.parent

VALID = textwrap.dedent("""\
    version: 1
    vault: {addr: "https://vault:8200", auth: {method: approle, role_id: r1, secret_id_file: sid}}
    endpoints:
      - {host: "*.amazonaws.com", provider: s3}
      - {host: "127.0.0.1:9000", provider: s3}
    keys:
      payroll: {vault: {path: secret/data/keycourier/payroll, field: key}}
      dev: {file: keys/dev.key}
    credentials:
      app1: {vault: {path: secret/data/keycourier/aws-app1}}
    rules:
      - {match: {provider: s3, bucket: "payroll-*", prefix: ""}, action: encrypt, key: payroll}
      - {match: {provider: s3, bucket: "payroll-*"}, action: passthrough}
      - {match: {provider: s3, bucket: "public-*"}, action: passthrough}
      - {match: {provider: "*"}, action: deny}
""")


def test_the_issue_example_loads_with_its_parts():
    policy = parse_policy(VALID, base_dir=Path("/etc/kc"))
    assert [e.host for e in policy.endpoints] == ["*.amazonaws.com", "127.0.0.1:9000"]
    assert policy.keys["payroll"].vault.mount == "secret"
    assert policy.keys["payroll"].vault.path == "keycourier/payroll"
    assert policy.keys["dev"].file == Path("/etc/kc/keys/dev.key")
    assert policy.vault.auth.method == "approle" and policy.vault.auth.secret_id_file == Path("/etc/kc/sid")
    assert policy.needs_vault
    assert [r.action for r in policy.rules] == ["encrypt", "passthrough", "passthrough", "deny"]


def test_the_repository_policy_is_valid():
    policy = load_policy(REPO / "policies.yaml")
    assert any(rule.action == "encrypt" for rule in policy.rules)


def test_first_matching_rule_wins_and_prefix_applies_to_objects():
    policy = parse_policy(VALID.replace('prefix: ""', 'prefix: "hr/"'))
    assert policy.rule_for("s3", "payroll-eu", "hr/2026.csv").action == "encrypt"
    assert policy.rule_for("s3", "payroll-eu", "it/x").action == "passthrough"
    assert policy.rule_for("s3", "payroll-eu", None).action == "encrypt"  # bucket calls match on bucket
    assert policy.rule_for("s3", "other", "x").action == "deny"
    assert policy.rule_for("s3", "PAYROLL-eu", "hr/x").action == "encrypt"


def test_endpoints_match_host_with_or_without_port():
    policy = parse_policy(VALID)
    assert policy.endpoint_for("bucket.s3.amazonaws.com", 443).provider == "s3"
    assert policy.endpoint_for("127.0.0.1", 9000) is not None
    assert policy.endpoint_for("127.0.0.1", 9001) is None
    assert policy.endpoint_for("amazonaws.com.evil.example", 443) is None
    assert policy.endpoint_for("127.0.0.1", 90001) is None


def test_literal_endpoint_hosts_are_kept_in_canonical_form():
    policy = parse_policy(VALID.replace('"127.0.0.1:9000"', '"LocalHost.:9000"'))
    assert policy.endpoint_for("localhost", 9000) is not None
    policy = parse_policy(VALID.replace('"127.0.0.1:9000"', '"127.1:9000"'))
    assert policy.endpoint_for("127.0.0.1", 9000) is not None


@pytest.mark.parametrize("edit, line, reason", [
    (("vault: {", "vault: {colour: red, "), 2, "unknown field 'colour' in vault"),
    (("key: payroll}", "key: payrol}"), 12, "unknown key name 'payrol'"),
    (('bucket: "public-*"', 'bucket: "public-[ab]"'), 14, "bad glob 'public-[ab]'"),
    (("  dev: {file", "  payroll: {file"), 8, "duplicate name 'payroll' (first at line 7)"),
    (("action: encrypt, key: payroll", "action: encrypt"), 12, "an encrypt rule needs a key"),
    (("action: deny}", "action: deny, key: dev}"), 15, "a deny rule takes no key"),
    (("action: deny}", "action: drop}"), 15, "unknown action 'drop'"),
    (("provider: s3}\n  - {host: \"127", "provider: gcs}\n  - {host: \"127"), 4, "unknown provider 'gcs'"),
    (("secret/data/keycourier/payroll", "secret/keycourier/payroll"), 7, "not a KV v2 path"),
    (("version: 1", "version: 2"), 1, "unsupported version 2"),
    (("rules:", "rulez:"), 11, "unknown field 'rulez'"),
    (("method: approle, role_id: r1, secret_id_file: sid", "method: approle"), 2, "missing required field"),
    (("- {match: {provider: s3, bucket: \"public-*\"}", "- {match: [s3]"), 14, "rule match must be a mapping"),
    (("payroll: {vault: {path: secret/data/keycourier/payroll, field: key}}", "payroll: {}"), 7, "needs exactly one source"),
    (("  dev: {file: keys/dev.key}", "  dev: {file: keys/dev.key"), 9, "invalid YAML"),
])
def test_errors_name_the_line_and_the_reason(edit, line, reason):
    old, new = edit
    assert old in VALID
    with pytest.raises(PolicyError) as raised:
        parse_policy(VALID.replace(old, new, 1), source="p.yaml")
    assert raised.value.line == line, str(raised.value)
    assert reason in raised.value.reason
    assert str(raised.value).startswith(f"p.yaml:{line}: ")


def test_unreadable_file_is_a_policy_error(tmp_path):
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.yaml")


def test_a_file_still_being_written_is_not_loaded_until_it_settles(tmp_path):
    path = tmp_path / "policies.yaml"
    path.write_text(VALID)
    watched = PolicyFile(path)
    path.write_text(VALID[: len(VALID) // 2])  # a copy half done
    assert watched.reload_if_changed() is False
    path.write_text(VALID.replace('"public-*"', '"open-*"'))  # finished before the next poll
    assert watched.reload_if_changed() is False
    assert watched.reload_if_changed() is True and watched.current.rules[2].bucket == "open-*"


def test_edit_on_disk_is_picked_up_and_an_invalid_edit_keeps_the_old_policy(tmp_path):
    path = tmp_path / "policies.yaml"
    path.write_text(VALID)
    watched = PolicyFile(path)
    assert watched.reload_if_changed() is False
    path.write_text(VALID.replace('"public-*"', '"open-*"'))
    assert watched.reload_if_changed() is False  # seen; loaded once it stays unchanged for one more poll
    assert watched.current.rules[2].bucket == "public-*"
    assert watched.reload_if_changed() is True
    assert watched.current.rules[2].bucket == "open-*"
    path.write_text(VALID.replace("action: deny}", "action: drop}"))
    watched.reload_if_changed()
    error = watched.reload_if_changed()
    assert isinstance(error, PolicyError) and "unknown action" in str(error)
    assert watched.current.rules[2].bucket == "open-*"


def test_configmap_style_symlink_swap_is_seen(tmp_path):
    # Kubernetes mounts ConfigMaps as policies.yaml -> ..data/policies.yaml, ..data -> ..<timestamp>.
    for version, bucket in (("..v1", "public-*"), ("..v2", "open-*")):
        (tmp_path / version).mkdir()
        (tmp_path / version / "policies.yaml").write_text(VALID.replace('"public-*"', f'"{bucket}"'))
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "policies.yaml").symlink_to("..data/policies.yaml")
    watched = PolicyFile(tmp_path / "policies.yaml")
    assert watched.current.rules[2].bucket == "public-*"
    (tmp_path / "..data_tmp").symlink_to("..v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert watched.reload_if_changed() is False
    assert watched.reload_if_changed() is True
    assert watched.current.rules[2].bucket == "open-*"


def test_paths_in_the_policy_follow_a_kubernetes_volume_update(tmp_path):
    # A projected token (or Secret) volume: token -> ..data/token, ..data -> ..<timestamp>; on renewal the kubelet
    # writes a new timestamp directory, swaps ..data and deletes the old directory.
    (tmp_path / "..v1").mkdir()
    (tmp_path / "..v1" / "token").write_text("first")
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "token").symlink_to("..data/token")
    policy = parse_policy(VALID.replace("auth: {method: approle, role_id: r1, secret_id_file: sid}",
                                        f"auth: {{method: kubernetes, role: r, token_file: {tmp_path / 'token'}}}"))
    (tmp_path / "..v2").mkdir()
    (tmp_path / "..v2" / "token").write_text("renewed")
    (tmp_path / "..data_tmp").symlink_to("..v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    shutil.rmtree(tmp_path / "..v1")
    assert policy.vault.auth.token_file.read_text() == "renewed"


def test_vault_kubernetes_auth_defaults_to_the_service_account_token():
    policy = parse_policy(VALID.replace("auth: {method: approle, role_id: r1, secret_id_file: sid}",
                                        "auth: {method: kubernetes, role: keycourier, mount: k8s-prod}"))
    assert policy.vault.auth.token_file == Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    assert (policy.vault.auth.role, policy.vault.auth.mount) == ("keycourier", "k8s-prod")
    with pytest.raises(PolicyError, match="unknown field 'role_id' in vault.auth \\(kubernetes\\)"):
        parse_policy(VALID.replace("method: approle, role_id", "method: kubernetes, role: r, role_id"))


MULTI = textwrap.dedent("""\
    version: 1
    endpoints:
      - {host: "*.blob.core.windows.net", provider: azure}
      - {host: "*.aliyuncs.com", provider: oss}
    keys:
      payroll: {file: k.key}
    oss_kms_key_ids:
      "3QFFFpRA5+XANHqwwbT4yXDmrT/2JaLt/FKHjzhOdoE=": kms-1
    rules:
      - {match: {provider: azure, account: "payroll*", bucket: salaries}, action: encrypt, key: payroll}
      - {match: {provider: oss, bucket: "hr-*"}, action: encrypt, oss_sse: KMS, kms_key_id: kms-2}
      - {match: {provider: "*"}, action: deny}
""")


def test_azure_accounts_and_oss_encryption_are_policy_fields():
    policy = parse_policy(MULTI)
    assert policy.rule_for("azure", "salaries", "a.csv", account="payrollprod").key == "payroll"
    assert policy.rule_for("azure", "salaries", "a.csv", account="other").action == "deny"
    assert (policy.rules[1].oss_sse, policy.rules[1].kms_key_id) == ("KMS", "kms-2")
    assert policy.oss_kms_key_ids == {"3QFFFpRA5+XANHqwwbT4yXDmrT/2JaLt/FKHjzhOdoE=": "kms-1"}


@pytest.mark.parametrize("edit, reason", [
    (("oss_sse: KMS, kms_key_id: kms-2", "oss_sse: DES"), "an OSS encrypt rule needs oss_sse: one of AES256, SM4, KMS"),
    (("oss_sse: KMS, kms_key_id: kms-2", "key: payroll"), "OSS takes no customer key"),
    (("oss_sse: KMS, kms_key_id: kms-2", "oss_sse: AES256, kms_key_id: kms-2"), "kms_key_id goes with oss_sse: KMS"),
    (("provider: azure, account", "provider: s3, account"), "account applies to azure rules only"),
    (("action: encrypt, key: payroll}", "action: encrypt, key: payroll, oss_sse: KMS}"), "oss_sse applies to oss rules only"),
    (('"3QFFFpRA5+XANHqwwbT4yXDmrT/2JaLt/FKHjzhOdoE="', '"not-a-fingerprint"'), "is not a base64 SHA-256"),
])
def test_provider_specific_fields_are_checked(edit, reason):
    old, new = edit
    assert old in MULTI
    with pytest.raises(PolicyError, match=re.escape(reason)):
        parse_policy(MULTI.replace(old, new))


def test_the_strictest_rule_a_bulk_request_can_reach():
    policy = parse_policy("""
version: 1
endpoints: []
rules:
  - {match: {provider: s3, bucket: "mixed", prefix: "secret/"}, action: deny}
  - {match: {provider: s3, bucket: "mixed"}, action: passthrough}
  - {match: {provider: s3, bucket: "open"}, action: passthrough}
  - {match: {provider: s3, bucket: "half", prefix: "a/"}, action: passthrough}
  - {match: {provider: azure, account: "acct", bucket: "c1"}, action: passthrough}
  - {match: {provider: "*"}, action: deny}
""")
    assert policy.strictest_rule_for("s3", "mixed").action == "deny"  # some of its objects are denied
    assert policy.strictest_rule_for("s3", "open").action == "passthrough"  # the catch-all deny is not reached
    assert policy.strictest_rule_for("s3", "half").action == "deny"  # objects outside a/ fall to the deny
    assert policy.strictest_rule_for("azure", None, "acct").action == "deny"  # any container of the account
    assert parse_policy("version: 1\nendpoints: []\nrules: [{match: {provider: s3, bucket: b, prefix: p/}, action: passthrough}]\n"
                        ).strictest_rule_for("s3", "b") is None  # objects outside p/ fall under no rule


@pytest.mark.parametrize("credentials, reason", [
    ("a: {file: a.yaml, access_key_id: AK1, account_name: acct}", "declares both access_key_id and account_name"),
    ("a: {file: a.yaml, access_key_id: AK1}\n  b: {file: b.yaml, access_key_id: AK1}", "access key id AK1 is declared by credential 'a' too"),
    ("a: {file: a.yaml, access_key_id: ''}", "access_key_id must be a non-empty string"),
    ("a: {access_key_id: AK1}", "needs exactly one source"),
])
def test_declared_credential_ids_are_validated(credentials, reason):
    with pytest.raises(PolicyError, match=re.escape(reason)):
        parse_policy(f"version: 1\nendpoints: []\ncredentials:\n  {credentials}\nrules: []\n")


def test_keys_take_no_access_key_id():
    with pytest.raises(PolicyError, match="unknown field 'access_key_id'"):
        parse_policy("version: 1\nendpoints: []\nkeys: {k: {file: k.key, access_key_id: AK1}}\nrules: []\n")


def test_rule_names_label_rules_and_are_checked():
    named = "version: 1\nendpoints: []\nrules:\n  - {name: payroll-eu, match: {provider: s3}, action: deny}\n  - {match: {provider: azure}, action: deny}\n"
    assert [rule.name for rule in parse_policy(named).rules] == ["payroll-eu", "rule5"]
    for bad in ("Payroll", "a b", "x" * 65, "1.5"):
        with pytest.raises(PolicyError, match="must be 1-64 of a-z"):
            parse_policy(named.replace("payroll-eu", bad))
    twice = named.replace("{match: {provider: azure}", "{name: payroll-eu, match: {provider: azure}")
    with pytest.raises(PolicyError, match="rule name 'payroll-eu' is taken by the rule at line 4"):
        parse_policy(twice)


def test_every_entry_error_is_collected_in_line_order():
    text = ("version: 1\nendpoints:\n  - {host: a, provider: nope}\n  - {host: b, provider: s3}\n"
            "credentials:\n  c: {}\nrules:\n  - {match: {provider: s3}, action: drop}\n  - {match: {provider: s3}, action: deny}\n")
    with pytest.raises(PolicyError) as raised:
        parse_policy(text, source="p.yaml")
    assert [str(error).split(": ")[0] for error in raised.value.errors] == ["p.yaml:3", "p.yaml:6", "p.yaml:8"]
    assert str(raised.value) == str(raised.value.errors[0])
