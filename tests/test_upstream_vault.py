"""The Vault test server, driven by the real hvac client the way keycourier drives Vault."""
import base64
import time

import hvac
import hvac.exceptions
import pytest
import requests
import trustme

from tests.upstreams.vault import VaultServer

DENIED_BY_POLICY = "1 error occurred:\n\t* permission denied\n\n"
INVALID_TOKEN = "2 errors occurred:\n\t* permission denied\n\t* invalid token\n\n"


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_pem(ca, tmp_path_factory):
    path = tmp_path_factory.mktemp("vault-ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def vault(ca):
    with VaultServer(ca) as server:
        yield server


@pytest.fixture
def connect(vault, ca_pem):
    """An hvac client for `vault`; root token unless told otherwise."""

    def client(token=None, **kwargs):
        return hvac.Client(url=vault.addr, verify=ca_pem, token=vault.root_token if token is None else token, **kwargs)

    return client


@pytest.fixture
def client(connect):
    return connect()


def read(client, path, **kwargs):
    return client.secrets.kv.v2.read_secret_version(path=path, raise_on_deleted_version=True, **kwargs)


def raw(vault, ca_pem, method, path):
    """The HTTP answer itself, for what hvac hides: status, headers, exact body."""
    headers = {"X-Vault-Token": vault.root_token}
    return requests.request(method, vault.addr + path, headers=headers, verify=ca_pem, timeout=5)


# --- KV v2 ---------------------------------------------------------------------------------------


def test_kv_write_then_read_latest_and_an_older_version(client):
    first = client.secrets.kv.v2.create_or_update_secret(path="tenants/acme", secret={"key": "one"})
    client.secrets.kv.v2.create_or_update_secret(path="tenants/acme", secret={"key": "two"})

    assert first["data"]["version"] == 1 and first["data"]["deletion_time"] == ""
    latest = read(client, "tenants/acme")
    assert latest["data"]["data"] == {"key": "two"}
    assert latest["data"]["metadata"]["version"] == 2
    assert read(client, "tenants/acme", version=1)["data"]["data"] == {"key": "one"}
    envelope = {"request_id", "lease_id", "renewable", "lease_duration", "data", "wrap_info", "warnings", "auth"}
    assert set(latest) == envelope


def test_kv_put_seeds_versions_that_hvac_reads(vault, client):
    assert vault.kv_put("app/db", {"password": "a"}) == 1
    assert vault.kv_put("app/db", {"password": "b"}) == 2

    assert read(client, "app/db")["data"]["data"] == {"password": "b"}


def test_kv_put_on_another_mount_creates_it(vault, client):
    vault.kv_put("k", {"v": 1}, mount="kv-keys")

    assert read(client, "k", mount_point="kv-keys")["data"]["data"] == {"v": 1}
    with pytest.raises(hvac.exceptions.InvalidPath):
        read(client, "k")


def test_metadata_lists_every_version(vault, client):
    vault.kv_put("app/db", {"password": "a"})
    vault.kv_put("app/db", {"password": "b"})

    metadata = client.secrets.kv.v2.read_secret_metadata(path="app/db")["data"]

    assert metadata["current_version"] == 2
    assert sorted(metadata["versions"]) == ["1", "2"]
    assert metadata["versions"]["1"]["destroyed"] is False


def test_list_returns_children_and_a_missing_folder_is_404(vault, client):
    vault.kv_put("tenants/acme", {"k": 1})
    vault.kv_put("tenants/globex/eu", {"k": 1})
    vault.kv_put("other", {"k": 1})

    assert client.secrets.kv.v2.list_secrets(path="tenants")["data"]["keys"] == ["acme", "globex/"]
    assert client.secrets.kv.v2.list_secrets(path="")["data"]["keys"] == ["other", "tenants/"]
    with pytest.raises(hvac.exceptions.InvalidPath):
        client.secrets.kv.v2.list_secrets(path="nothing-here")


def test_soft_delete_gives_404_with_metadata_then_undelete_restores(vault, client):
    vault.kv_put("app/db", {"password": "a"})

    client.secrets.kv.v2.delete_latest_version_of_secret(path="app/db")

    with pytest.raises(hvac.exceptions.InvalidPath) as deleted:
        read(client, "app/db")
    assert deleted.value.json["data"]["data"] is None
    assert deleted.value.json["data"]["metadata"]["deletion_time"] != ""
    assert "errors" not in deleted.value.json  # Vault answers with the version's metadata instead
    client.secrets.kv.v2.undelete_secret_versions(path="app/db", versions=[1])
    assert read(client, "app/db")["data"]["data"] == {"password": "a"}


def test_destroy_and_metadata_delete(vault, client):
    vault.kv_put("app/db", {"password": "a"})
    vault.kv_put("app/db", {"password": "b"})

    client.secrets.kv.v2.destroy_secret_versions(path="app/db", versions=[1])
    with pytest.raises(hvac.exceptions.InvalidPath) as destroyed:
        read(client, "app/db", version=1)
    assert destroyed.value.json["data"]["metadata"]["destroyed"] is True
    assert read(client, "app/db")["data"]["data"] == {"password": "b"}

    client.secrets.kv.v2.delete_metadata_and_all_versions(path="app/db")
    with pytest.raises(hvac.exceptions.InvalidPath):
        client.secrets.kv.v2.read_secret_metadata(path="app/db")


def test_check_and_set(client):
    kv = client.secrets.kv.v2
    kv.create_or_update_secret(path="app/db", secret={"v": 1}, cas=0)

    with pytest.raises(hvac.exceptions.InvalidRequest) as mismatch:
        kv.create_or_update_secret(path="app/db", secret={"v": 2}, cas=0)

    assert mismatch.value.errors == ["check-and-set parameter did not match the current version"]
    assert kv.create_or_update_secret(path="app/db", secret={"v": 2}, cas=1)["data"]["version"] == 2


def test_cas_required_by_metadata(client):
    kv = client.secrets.kv.v2
    kv.update_metadata(path="app/db", cas_required=True)

    with pytest.raises(hvac.exceptions.InvalidRequest) as refused:
        kv.create_or_update_secret(path="app/db", secret={"v": 1})

    assert refused.value.errors == ["check-and-set parameter required for this call"]


def test_only_max_versions_are_kept(client):
    kv = client.secrets.kv.v2
    kv.update_metadata(path="app/db", max_versions=2)
    for value in range(3):
        kv.create_or_update_secret(path="app/db", secret={"v": value})

    metadata = kv.read_secret_metadata(path="app/db")["data"]
    assert sorted(metadata["versions"]) == ["2", "3"] and metadata["oldest_version"] == 2
    with pytest.raises(hvac.exceptions.InvalidPath):
        read(client, "app/db", version=1)


def test_missing_secret_is_404_with_an_empty_errors_list(vault, ca_pem):
    answer = raw(vault, ca_pem, "GET", "/v1/secret/data/nothing")

    assert answer.status_code == 404
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json() == {"errors": []}


def test_unknown_mount_path_and_operation(vault, ca_pem):
    no_mount = raw(vault, ca_pem, "GET", "/v1/nomount/x")
    no_path = raw(vault, ca_pem, "GET", "/v1/secret/x")
    no_operation = raw(vault, ca_pem, "DELETE", "/v1/auth/token/lookup-self")
    unknown_verb = raw(vault, ca_pem, "PURGE", "/v1/secret/data/x")

    assert (no_mount.status_code, no_mount.json()) == (
        404, {"errors": ['no handler for route "nomount/x". route entry not found.']})
    assert (no_path.status_code, no_path.json()) == (404, {"errors": ["1 error occurred:\n\t* unsupported path\n\n"]})
    assert no_operation.status_code == 405
    assert no_operation.json() == {"errors": ["1 error occurred:\n\t* unsupported operation\n\n"]}
    assert (unknown_verb.status_code, unknown_verb.json()) == (405, {"errors": []})


# --- tokens and policies ---------------------------------------------------------------------------


def test_bad_or_missing_token_is_forbidden(vault, connect):
    vault.kv_put("app/db", {"password": "a"})

    with pytest.raises(hvac.exceptions.Forbidden) as bad:
        read(connect(token="hvs.not-a-token"), "app/db")
    with pytest.raises(hvac.exceptions.Forbidden) as missing:
        read(connect(token=""), "app/db")

    assert bad.value.errors == [INVALID_TOKEN]
    assert missing.value.errors == ["permission denied"]


def test_authorization_bearer_header_is_accepted(vault, ca_pem):
    answer = requests.get(
        vault.addr + "/v1/auth/token/lookup-self",
        headers={"Authorization": f"Bearer {vault.root_token}"},
        verify=ca_pem,
        timeout=5,
    )

    assert answer.status_code == 200 and answer.json()["data"]["policies"] == ["root"]


def test_policy_allows_its_paths_and_denies_the_rest(vault, connect):
    vault.set_policy("kc-read", {
        "secret/data/keycourier/*": ["read"],
        "secret/data/keycourier/blocked": ["read"],
        "secret/data/keycourier/list-only": ["list"],  # an exact path outranks the glob
        "secret/data/keycourier/eu/*": ["read"],  # outranks the next one: its first wildcard comes later
        "secret/data/keycourier/+/payroll": ["list"],
    })
    vault.set_policy("kc-block", {"secret/data/keycourier/blocked": ["deny"]})  # deny beats the read above
    token = connect().auth.token.create(policies=["kc-read", "kc-block"], ttl="1h")["auth"]["client_token"]
    client = connect(token=token)
    for path in ("keycourier/payroll", "keycourier/eu/payroll", "keycourier/blocked", "keycourier/list-only",
                 "elsewhere"):
        vault.kv_put(path, {"key": "k"})

    assert read(client, "keycourier/payroll")["data"]["data"] == {"key": "k"}
    assert read(client, "keycourier/eu/payroll")["data"]["data"] == {"key": "k"}
    for denied in (
        lambda: read(client, "elsewhere"),
        lambda: read(client, "keycourier/blocked"),
        lambda: read(client, "keycourier/list-only"),
        lambda: client.secrets.kv.v2.create_or_update_secret(path="keycourier/payroll", secret={"key": "x"}),
    ):
        with pytest.raises(hvac.exceptions.Forbidden) as refused:
            denied()
        assert refused.value.errors == [DENIED_BY_POLICY]


def test_child_token_policies_must_be_a_subset(vault, connect):
    vault.set_policy("creator", {"auth/token/create": ["update"]})
    parent = connect(token=connect().auth.token.create(policies=["creator"], ttl="1h")["auth"]["client_token"])

    child = parent.auth.token.create(policies=["creator"], ttl="1m")["auth"]

    assert child["policies"] == ["creator", "default"] and child["lease_duration"] == 60
    with pytest.raises(hvac.exceptions.InvalidRequest):
        parent.auth.token.create(policies=["root"], ttl="1m")


def test_renew_self_extends_the_ttl(connect):
    token = connect().auth.token.create(policies=["default"], ttl="2s")["auth"]["client_token"]
    client = connect(token=token)

    renewed = client.auth.token.renew_self(increment="1h")

    assert renewed["auth"]["lease_duration"] == 3600 and renewed["auth"]["renewable"] is True
    assert client.auth.token.lookup_self()["data"]["ttl"] > 3500


def test_renewal_stops_at_the_explicit_max_ttl_and_the_token_then_expires(connect):
    created = connect().auth.token.create(policies=["default"], ttl="1s", explicit_max_ttl="2s")["auth"]
    client = connect(token=created["client_token"])

    renewed = client.auth.token.renew_self(increment=60)

    assert renewed["auth"]["lease_duration"] <= 2
    assert "capped accordingly" in renewed["warnings"][0]
    time.sleep(2.1)
    with pytest.raises(hvac.exceptions.Forbidden) as expired:
        client.auth.token.renew_self(increment=60)
    assert expired.value.errors == [INVALID_TOKEN]
    assert not client.is_authenticated()


def test_revoke_self_ends_the_token(connect):
    client = connect(token=connect().auth.token.create(policies=["default"], ttl="1h")["auth"]["client_token"])

    client.auth.token.revoke_self()

    assert not client.is_authenticated()


# --- AppRole and Kubernetes --------------------------------------------------------------------------


def test_approle_login_gives_a_token_that_reads_secrets(vault, connect):
    vault.set_policy("kc", {"secret/data/keycourier/*": ["read"]})
    vault.kv_put("keycourier/payroll", {"key": "k"})
    role_id, secret_id = vault.add_approle("keycourier", token_policies=["kc"], token_ttl=600)
    client = connect(token="")

    login = client.auth.approle.login(role_id=role_id, secret_id=secret_id)

    assert login["auth"]["lease_duration"] == 600 and login["auth"]["renewable"] is True
    assert login["auth"]["policies"] == ["default", "kc"]
    assert read(client, "keycourier/payroll")["data"]["data"] == {"key": "k"}


def test_approle_rejects_a_wrong_secret_id_or_role_id(vault, connect):
    role_id, _ = vault.add_approle("keycourier")

    for bad_role_id, bad_secret_id in ((role_id, "wrong"), ("unknown-role-id", "wrong")):
        with pytest.raises(hvac.exceptions.InvalidRequest) as refused:
            connect(token="").auth.approle.login(role_id=bad_role_id, secret_id=bad_secret_id)
        assert refused.value.errors == ["invalid role or secret ID"]


def test_approle_secret_ids_expire(vault, connect):
    role_id, secret_id = vault.add_approle("keycourier", secret_id_ttl=1)
    time.sleep(1.05)

    with pytest.raises(hvac.exceptions.InvalidRequest):
        connect(token="").auth.approle.login(role_id=role_id, secret_id=secret_id)


def test_approle_role_id_and_new_secret_ids_through_the_api(vault, client, connect):
    role_id, _ = vault.add_approle("keycourier")

    assert client.auth.approle.read_role_id("keycourier")["data"]["role_id"] == role_id
    new_secret_id = client.auth.approle.generate_secret_id("keycourier")["data"]["secret_id"]
    assert connect(token="").auth.approle.login(role_id=role_id, secret_id=new_secret_id)["auth"]["client_token"]


def test_kubernetes_login(vault, connect):
    vault.add_kubernetes_role("keycourier", service_account_jwt="header.payload.signature", token_ttl=300)
    client = connect(token="")

    login = client.auth.kubernetes.login(role="keycourier", jwt="header.payload.signature")

    assert login["auth"]["lease_duration"] == 300
    assert client.auth.token.lookup_self()["data"]["path"] == "auth/kubernetes/login"
    with pytest.raises(hvac.exceptions.Forbidden):
        connect(token="").auth.kubernetes.login(role="keycourier", jwt="another.service.account")
    with pytest.raises(hvac.exceptions.InvalidRequest) as unknown:
        connect(token="").auth.kubernetes.login(role="nobody", jwt="header.payload.signature")
    assert unknown.value.errors == ['invalid role name "nobody"']


# --- namespaces ---------------------------------------------------------------------------------------


def test_namespaces_are_separate_key_spaces(vault, connect, ca_pem):
    vault.kv_put("app", {"who": "root"})
    vault.kv_put("app", {"who": "team-a"}, namespace="team-a")

    assert read(connect(namespace="team-a"), "app")["data"]["data"] == {"who": "team-a"}
    assert read(connect(), "app")["data"]["data"] == {"who": "root"}
    with pytest.raises(hvac.exceptions.InvalidPath):
        read(connect(namespace="team-b"), "app")
    by_path = raw(vault, ca_pem, "GET", "/v1/team-a/secret/data/app")  # Enterprise's path form of the header
    assert by_path.json()["data"]["data"] == {"who": "team-a"}


def test_a_namespace_token_does_not_reach_its_parent(vault, connect):
    role_id, secret_id = vault.add_approle("keycourier", namespace="team-a")
    inside = connect(token="", namespace="team-a")
    token = inside.auth.approle.login(role_id=role_id, secret_id=secret_id)["auth"]["client_token"]

    assert inside.auth.token.lookup_self()["data"]["path"] == "auth/approle/login"
    with pytest.raises(hvac.exceptions.Forbidden):
        connect(token=token).auth.token.lookup_self()


# --- sys/health, sealing, outages ---------------------------------------------------------------------


def test_health_when_active_and_when_sealed(vault, client):
    health = client.sys.read_health_status(method="GET")
    assert health["initialized"] is True and health["sealed"] is False and health["version"]

    vault.seal(True)
    sealed = client.sys.read_health_status(method="GET")
    assert sealed.status_code == 503 and sealed.json()["sealed"] is True
    assert client.sys.read_health_status(method="HEAD").status_code == 503
    assert client.sys.read_seal_status()["sealed"] is True
    with pytest.raises(hvac.exceptions.VaultDown) as down:
        read(client, "anything")
    assert down.value.errors == ["Vault is sealed"]

    vault.seal(False)
    assert client.sys.read_health_status(method="GET")["sealed"] is False


def test_set_down_refuses_connections_until_back_up_on_the_same_address(vault, client):
    vault.kv_put("app/db", {"password": "a"})
    address = vault.addr
    assert read(client, "app/db")  # leaves a pooled keep-alive connection behind

    vault.set_down(True)
    with pytest.raises(requests.exceptions.ConnectionError):
        read(client, "app/db")
    with pytest.raises(requests.exceptions.ConnectionError):
        read(client, "app/db")

    vault.set_down(False)
    assert vault.addr == address
    assert read(client, "app/db")["data"]["data"] == {"password": "a"}


# --- bookkeeping ---------------------------------------------------------------------------------------


def test_count_and_the_recorded_requests(vault, client):
    vault.kv_put("app/db", {"password": "a"})
    read(client, "app/db")
    read(client, "app/db")
    client.secrets.kv.v2.create_or_update_secret(path="app/db", secret={"password": "b"})

    assert vault.count("GET", "/v1/secret/data/app/db") == 2
    assert vault.count("post", "/v1/secret/data/") == 1
    assert vault.count("GET", "/v1/secret/data/other") == 0
    last = vault.requests[-1]
    assert last.headers["x-vault-request"] == "true"  # hvac's SSRF guard header
    assert last.headers["x-vault-token"] == vault.root_token
    assert vault.root_token not in repr(last)


def test_nothing_is_logged(vault, client, capfd):
    vault.kv_put("app/db", {"password": "hunter2"})
    read(client, "app/db")

    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_plain_http_when_tls_is_off():
    with VaultServer(None, tls=False, root_token="t") as server:
        server.kv_put("app", {"v": 1})
        client = hvac.Client(url=server.addr, token="t")
        assert server.addr.startswith("http://")
        assert read(client, "app")["data"]["data"] == {"v": 1}


# --- transit ---------------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_transit_encrypt_decrypt_and_rotation(client):
    transit = client.secrets.transit
    transit.create_key(name="tenant")

    v1 = transit.encrypt_data(name="tenant", plaintext=b64(b"object key"))["data"]["ciphertext"]
    transit.rotate_key(name="tenant")
    v2 = transit.encrypt_data(name="tenant", plaintext=b64(b"object key"))["data"]["ciphertext"]

    assert v1.startswith("vault:v1:") and v2.startswith("vault:v2:")
    for ciphertext in (v1, v2):
        assert transit.decrypt_data(name="tenant", ciphertext=ciphertext)["data"]["plaintext"] == b64(b"object key")
    assert sorted(transit.read_key(name="tenant")["data"]["keys"]) == ["1", "2"]


def test_transit_rejects_tampered_or_foreign_ciphertext(client):
    transit = client.secrets.transit
    ciphertext = transit.encrypt_data(name="tenant", plaintext=b64(b"object key"))["data"]["ciphertext"]
    sealed = bytearray(base64.b64decode(ciphertext.removeprefix("vault:v1:")))
    sealed[-1] ^= 1

    with pytest.raises(hvac.exceptions.InvalidRequest) as tampered:
        transit.decrypt_data(name="tenant", ciphertext="vault:v1:" + b64(bytes(sealed)))
    with pytest.raises(hvac.exceptions.InvalidRequest) as unprefixed:
        transit.decrypt_data(name="tenant", ciphertext=ciphertext.removeprefix("vault:v1:"))
    with pytest.raises(hvac.exceptions.InvalidRequest) as no_key:
        transit.decrypt_data(name="nobody", ciphertext=ciphertext)

    assert tampered.value.errors == ["cipher: message authentication failed"]
    assert unprefixed.value.errors == ["invalid ciphertext: no prefix"]
    assert no_key.value.errors == ["encryption key not found"]


def test_transit_datakey(client):
    transit = client.secrets.transit
    transit.create_key(name="tenant")

    plain = transit.generate_data_key(name="tenant", key_type="plaintext")["data"]
    wrapped = transit.generate_data_key(name="tenant", key_type="wrapped")["data"]

    assert len(base64.b64decode(plain["plaintext"])) == 32
    assert "plaintext" not in wrapped
    unwrapped = transit.decrypt_data(name="tenant", ciphertext=plain["ciphertext"])["data"]["plaintext"]
    assert unwrapped == plain["plaintext"]
