"""Keys and credentials from the Vault-API test server through the real hvac client."""
import base64
import threading
import time

import pytest

from keycourier.keys import KeyUnavailable, Secrets, blocking
from keycourier.policy import parse_policy
from keycourier.vault import Vault, VaultError
from tests.upstreams.vault import VaultServer

KEY_V1, KEY_V2 = bytes(range(32)), bytes(range(100, 132))


@pytest.fixture(scope="module")
def vault(ca):
    with VaultServer(ca) as server:
        server.kv_put("keycourier/payroll", {"key": base64.b64encode(KEY_V1).decode()})
        server.kv_put("keycourier/payroll", {"key": base64.b64encode(KEY_V2).decode()})
        server.kv_put("keycourier/short", {"key": base64.b64encode(b"short").decode()})
        server.kv_put("keycourier/nofield", {"other": "x"})
        server.kv_put("keycourier/aws-app1", {"access_key_id": "AKIDVAULT", "secret_access_key": "from-vault"})
        server.set_policy("keycourier", {"secret/data/keycourier/*": ["read"]})
        yield server


def key_of(secrets, policy, name):
    return blocking(lambda: secrets.key(policy, policy.keys[name]))


def policy_for(vault, ca_pem, tmp_path, auth="{method: token}", ttl=300):
    return parse_policy(f"""
version: 1
vault: {{addr: "{vault.addr}", ca_cert: "{ca_pem}", auth: {auth}}}
key_cache_ttl: {ttl}
endpoints: []
keys:
  latest: {{vault: {{path: secret/data/keycourier/payroll}}}}
  first: {{vault: {{path: secret/data/keycourier/payroll, version: 1}}}}
  short: {{vault: {{path: secret/data/keycourier/short}}}}
  nofield: {{vault: {{path: secret/data/keycourier/nofield}}}}
  missing: {{vault: {{path: secret/data/keycourier/missing}}}}
credentials:
  app1: {{vault: {{path: secret/data/keycourier/aws-app1}}}}
rules: []
""", base_dir=tmp_path)


def test_token_auth_reads_latest_and_pinned_versions(vault, ca_pem, tmp_path, monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", vault.root_token)
    policy = policy_for(vault, ca_pem, tmp_path)
    secrets = Secrets()
    latest = key_of(secrets, policy, "latest")
    assert (latest.material, latest.version) == (KEY_V2, "v2")
    first = key_of(secrets, policy, "first")
    assert (first.material, first.version) == (KEY_V1, "v1")
    assert blocking(lambda: secrets.credential_for(policy, "AKIDVAULT")).secret_access_key == "from-vault"


@pytest.mark.parametrize("name, reason", [
    ("short", "key 'short' decodes to 5 bytes, not 32"),
    ("nofield", "key 'nofield': Vault secret secret/data/keycourier/nofield has no field 'key'"),
    ("missing", "key 'missing': Vault has no secret at secret/data/keycourier/missing"),
])
def test_bad_or_missing_keys_are_named(vault, ca_pem, tmp_path, monkeypatch, name, reason):
    monkeypatch.setenv("VAULT_TOKEN", vault.root_token)
    policy = policy_for(vault, ca_pem, tmp_path)
    with pytest.raises(KeyUnavailable) as raised:
        key_of(Secrets(), policy, name)
    assert str(raised.value) == reason


def test_approle_login_and_re_login_when_the_token_expires(vault, ca_pem, tmp_path):
    role_id, secret_id = vault.add_approle("kc-short", token_policies=["keycourier"], token_ttl=1)
    (tmp_path / "sid").write_text(secret_id)
    policy = policy_for(vault, ca_pem, tmp_path, auth=f"{{method: approle, role_id: {role_id}, secret_id_file: sid}}", ttl=0)
    secrets = Secrets()
    assert key_of(secrets, policy, "latest").material == KEY_V2
    logins = vault.count("POST", "/v1/auth/approle/login")
    time.sleep(1.5)  # the AppRole token has expired now
    assert key_of(secrets, policy, "latest").material == KEY_V2
    assert vault.count("POST", "/v1/auth/approle/login") == logins + 1


def test_wrong_token_is_a_clear_refusal(vault, ca_pem, tmp_path, monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", "not-a-token")
    policy = policy_for(vault, ca_pem, tmp_path)
    with pytest.raises(KeyUnavailable, match=r"Vault denied access to auth/token/lookup-self \(permission denied\)"):
        key_of(Secrets(), policy, "latest")


def test_concurrent_requests_for_one_key_make_one_vault_read(vault, ca_pem, tmp_path, monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", vault.root_token)
    policy = policy_for(vault, ca_pem, tmp_path)
    secrets = Secrets()
    before = vault.count("GET", "/v1/secret/data/keycourier/payroll")
    threads = [threading.Thread(target=key_of, args=(secrets, policy, "latest")) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert vault.count("GET", "/v1/secret/data/keycourier/payroll") == before + 1


def test_vault_down_is_key_unavailable_with_the_reason(vault, ca_pem, tmp_path, monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", vault.root_token)
    policy = policy_for(vault, ca_pem, tmp_path)
    vault.set_down(True)
    try:
        with pytest.raises(KeyUnavailable, match=f"Vault at {vault.addr} is unreachable"):
            key_of(Secrets(), policy, "latest")
    finally:
        vault.set_down(False)


def test_sealed_vault_is_key_unavailable(vault, ca_pem, tmp_path, monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", vault.root_token)
    policy = policy_for(vault, ca_pem, tmp_path)
    vault.seal(True)
    try:
        with pytest.raises(KeyUnavailable, match="sealed or down"):
            key_of(Secrets(), policy, "latest")
    finally:
        vault.seal(False)


def test_untrusted_vault_certificate_is_refused(vault, tmp_path, monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", vault.root_token)
    monkeypatch.delenv("VAULT_CACERT", raising=False)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    policy = parse_policy(f'version: 1\nvault: {{addr: "{vault.addr}"}}\nendpoints: []\n'
                          "keys: {k: {vault: {path: secret/data/keycourier/payroll}}}\nrules: []\n")
    with pytest.raises(KeyUnavailable, match="failed TLS verification"):
        key_of(Secrets(), policy, "k")


def test_plain_http_vault_and_missing_settings_are_refused():
    with pytest.raises(VaultError, match="is not https"):
        Vault(None, environ={"VAULT_ADDR": "http://127.0.0.1:8200"})
    with pytest.raises(VaultError, match="no Vault address"):
        Vault(None, environ={})


def test_environment_configures_vault_like_the_vault_cli(vault, ca_pem):
    environ = {"VAULT_ADDR": vault.addr, "VAULT_CACERT": str(ca_pem), "VAULT_TOKEN": vault.root_token}
    policy = parse_policy("version: 1\nendpoints: []\nkeys: {k: {vault: {path: secret/data/keycourier/payroll}}}\nrules: []\n")
    secrets = Secrets(vault_factory=lambda p: Vault(p.vault, environ=environ))
    assert key_of(secrets, policy, "k").material == KEY_V2


def test_kubernetes_login_with_the_service_account_token(vault, ca_pem, tmp_path):
    vault.add_kubernetes_role("keycourier-sidecar", service_account_jwt="eyJhbGciOi.test.jwt", token_policies=["keycourier"])
    (tmp_path / "sa-token").write_text("eyJhbGciOi.test.jwt")
    policy = policy_for(vault, ca_pem, tmp_path, auth="{method: kubernetes, role: keycourier-sidecar, token_file: sa-token}")
    assert key_of(Secrets(), policy, "latest").material == KEY_V2
    (tmp_path / "sa-token").write_text("a-forged.jwt")
    with pytest.raises(KeyUnavailable, match="auth/kubernetes/login"):
        key_of(Secrets(), policy, "latest")


def test_token_is_renewed_before_expiry_and_login_repeated_when_renewal_fails(vault, ca_pem, tmp_path):
    role_id, secret_id = vault.add_approle("kc-renew", token_policies=["keycourier"], token_ttl=30)
    (tmp_path / "sid").write_text(secret_id)
    now = [1000.0]
    policy = policy_for(vault, ca_pem, tmp_path, auth=f"{{method: approle, role_id: {role_id}, secret_id_file: sid}}", ttl=0)
    client = Vault(policy.vault, clock=lambda: now[0])
    secrets = Secrets(vault_factory=lambda p: client)
    secrets.cache.clock = lambda: now[0]
    logins, renewals = (lambda: vault.count("POST", "/v1/auth/approle/login"),
                        lambda: vault.count("POST", "/v1/auth/token/renew-self"))
    start_logins, start_renewals = logins(), renewals()
    key_of(secrets, policy, "latest")
    now[0] += 15  # half the lease: nothing to do
    key_of(secrets, policy, "latest")
    assert (logins() - start_logins, renewals() - start_renewals) == (1, 0)
    now[0] += 6  # past two thirds: renew, no new login
    key_of(secrets, policy, "latest")
    assert (logins() - start_logins, renewals() - start_renewals) == (1, 1)
    client.client.auth.token.revoke_self()  # renewal will now fail
    now[0] += 25
    assert key_of(secrets, policy, "latest").material == KEY_V2
    assert (logins() - start_logins, renewals() - start_renewals) == (2, 2)


def test_vault_namespace_from_the_environment(vault, ca_pem):
    vault.kv_put("keycourier/payroll", {"key": base64.b64encode(KEY_V1[::-1]).decode()}, namespace="team-a")
    environ = {"VAULT_ADDR": vault.addr, "VAULT_CACERT": str(ca_pem), "VAULT_TOKEN": vault.root_token,
               "VAULT_NAMESPACE": "team-a"}
    policy = parse_policy("version: 1\nendpoints: []\nkeys: {k: {vault: {path: secret/data/keycourier/payroll}}}\nrules: []\n")
    secrets = Secrets(vault_factory=lambda p: Vault(p.vault, environ=environ))
    assert key_of(secrets, policy, "k").material == KEY_V1[::-1]


def test_an_expired_key_is_served_stale_while_vault_is_unreachable_but_not_after(vault, ca_pem, tmp_path, monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", vault.root_token)
    now = [0.0]
    policy = parse_policy(f"""
version: 1
vault: {{addr: "{vault.addr}", ca_cert: "{ca_pem}"}}
key_cache_ttl: 10
key_cache_stale_ttl: 60
endpoints: []
keys: {{latest: {{vault: {{path: secret/data/keycourier/payroll}}}}}}
rules: []
""")
    secrets = Secrets()
    secrets.cache.clock = lambda: now[0]
    assert key_of(secrets, policy, "latest").material == KEY_V2
    now[0] = 30  # expired, within the stale grace
    vault.set_down(True)
    try:
        assert key_of(secrets, policy, "latest").material == KEY_V2
        now[0] = 71  # past ttl + stale grace: fail closed
        with pytest.raises(KeyUnavailable, match="unreachable"):
            key_of(secrets, policy, "latest")
    finally:
        vault.set_down(False)


def test_read_keys_are_every_live_version_back_to_min_version(vault, ca_pem, tmp_path, monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", vault.root_token)
    keys = [bytes([n]) * 32 for n in range(1, 5)]
    for key in keys:
        vault.kv_put("keycourier/rotating", {"key": base64.b64encode(key).decode()})
    hvac_client = Vault(parse_policy(f'version: 1\nvault: {{addr: "{vault.addr}", ca_cert: "{ca_pem}"}}\nendpoints: []\nrules: []\n').vault)
    hvac_client.client.token = vault.root_token
    hvac_client.client.secrets.kv.v2.delete_secret_versions("keycourier/rotating", versions=[2])
    policy = parse_policy(f"""
version: 1
vault: {{addr: "{vault.addr}", ca_cert: "{ca_pem}"}}
endpoints: []
keys:
  all: {{vault: {{path: secret/data/keycourier/rotating}}}}
  recent: {{vault: {{path: secret/data/keycourier/rotating, min_version: 3}}}}
  pinned: {{vault: {{path: secret/data/keycourier/rotating, version: 3}}}}
rules: []
""")
    secrets = Secrets()
    read = lambda name: [(k.version, k.material) for k in blocking(lambda: secrets.read_keys(policy, policy.keys[name]))]
    assert read("all") == [("v4", keys[3]), ("v3", keys[2]), ("v1", keys[0])]  # v2 is deleted: skipped
    assert read("recent") == [("v4", keys[3]), ("v3", keys[2])]
    assert read("pinned") == [("v3", keys[2]), ("v4", keys[3]), ("v1", keys[0])]  # writes use the pinned one
