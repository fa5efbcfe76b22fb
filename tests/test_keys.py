import base64
import threading
import time

import pytest

from keycourier.keys import KeyUnavailable, NotCached, Secrets, TtlCache, blocking, decode_key, generate_key_file
from keycourier.policy import parse_policy

KEY = bytes(range(32))


def policy_with_key_file(tmp_path, mode=0o600, content=None):
    key_file = tmp_path / "k.key"
    key_file.write_text(content if content is not None else base64.b64encode(KEY).decode() + "\n")
    key_file.chmod(mode)
    creds = tmp_path / "creds.yaml"
    creds.write_text("access_key_id: AKIDEXAMPLE\nsecret_access_key: s3cr3t\n")
    creds.chmod(0o600)
    return parse_policy(
        "version: 1\nendpoints: []\nkeys: {dev: {file: k.key}}\ncredentials: {app: {file: creds.yaml}}\nrules: []\n",
        base_dir=tmp_path,
    )


def read_dev_key(policy):
    secrets = Secrets()
    return blocking(lambda: secrets.key(policy, policy.keys["dev"]))


def read_credential(policy, access_key_id):
    secrets = Secrets()
    return blocking(lambda: secrets.credential_for(policy, access_key_id))


def test_file_key_decodes_to_32_bytes_with_fingerprints(tmp_path):
    policy = policy_with_key_file(tmp_path)
    secrets = Secrets()
    key = blocking(lambda: secrets.key(policy, policy.keys["dev"]))
    assert key.material == KEY and key.version == "file"
    assert key.md5_b64 == "tP/LI3N87DFaSk0aoqYgzg=="  # base64(md5(bytes(range(32)))), computed with openssl
    assert KEY.hex() not in repr(key) and base64.b64encode(KEY).decode() not in repr(key)


def test_key_file_readable_by_others_is_refused(tmp_path):
    policy = policy_with_key_file(tmp_path, mode=0o644)
    with pytest.raises(KeyUnavailable, match=r"readable by group/others \(mode 644\)"):
        read_dev_key(policy)


@pytest.mark.parametrize("content, reason", [
    ("not base64!", "not valid base64"),
    (base64.b64encode(b"short").decode(), "decodes to 5 bytes, not 32"),
])
def test_bad_key_names_the_key_never_shows_it(tmp_path, content, reason):
    policy = policy_with_key_file(tmp_path, content=content)
    with pytest.raises(KeyUnavailable) as raised:
        read_dev_key(policy)
    assert reason in str(raised.value) and "'dev'" in str(raised.value)
    assert content not in str(raised.value)


def test_credentials_are_found_by_access_key_id(tmp_path):
    policy = policy_with_key_file(tmp_path)
    secrets = Secrets()
    assert blocking(lambda: secrets.credential_for(policy, "AKIDEXAMPLE")).secret_access_key == "s3cr3t"
    assert blocking(lambda: secrets.credential_for(policy, "AKIDOTHER")) is None
    assert "s3cr3t" not in repr(blocking(lambda: secrets.credential_for(policy, "AKIDEXAMPLE")))


def test_keygen_writes_owner_only_and_never_overwrites(tmp_path):
    path = tmp_path / "keys" / "new.key"
    generate_key_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(decode_key("new", path.read_text())) == 32
    with pytest.raises(FileExistsError):
        generate_key_file(path)


def cached(cache, entry, load, **options):
    return blocking(lambda: cache.get(entry, 10, load, **options))


def run_together(ask, release: threading.Event, callers: int = 8) -> None:
    """`callers` threads call `ask` at once; their loads are let go only after all have missed."""
    threads = [threading.Thread(target=ask) for _ in range(callers)]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    release.set()
    for thread in threads:
        thread.join()


def test_cache_loads_once_for_concurrent_misses_and_again_after_ttl():
    now = [0.0]
    cache = TtlCache(clock=lambda: now[0])
    loads = []
    release = threading.Event()

    def slow_load():
        loads.append(1)
        release.wait(5)
        return "value"

    results = []
    run_together(lambda: results.append(cached(cache, "k", slow_load)), release)
    assert results == ["value"] * 8 and len(loads) == 1
    now[0] = 9.9
    cached(cache, "k", slow_load)
    assert len(loads) == 1
    now[0] = 10.1
    cached(cache, "k", slow_load)
    assert len(loads) == 2


def test_a_miss_never_runs_its_load_on_the_callers_thread():
    cache = TtlCache()
    callers = []
    with pytest.raises(NotCached) as missing:
        cache.get("k", 10, lambda: callers.append(threading.current_thread()) or "value")
    missing.value.wait()
    assert callers and callers[0] is not threading.current_thread()
    assert cache.get("k", 10, lambda: "never") == "value"


def test_a_slow_load_holds_up_only_the_requests_that_need_it():
    cache = TtlCache()
    release = threading.Event()
    cached(cache, "ready", lambda: "ready")
    with pytest.raises(NotCached) as slow:
        cache.get("slow", 10, lambda: release.wait(5) and "slow")
    started = time.monotonic()
    assert cache.get("ready", 10, lambda: "never") == "ready"  # answered while the slow load runs
    assert time.monotonic() - started < 0.5 and not slow.value.loads[0].done()
    release.set()
    slow.value.wait()


def test_a_failure_is_shared_by_concurrent_misses_and_kept_briefly():
    now = [0.0]
    cache = TtlCache(clock=lambda: now[0])
    attempts = []
    release = threading.Event()

    def failing_load():
        attempts.append(1)
        release.wait(5)
        raise KeyUnavailable("Vault has no secret at secret/data/x", transient=False)

    errors = []

    def ask():
        try:
            cached(cache, "k", failing_load, failure_ttl=5)
        except KeyUnavailable as exc:
            errors.append(str(exc))

    run_together(ask, release)
    assert len(attempts) == 1 and errors == ["Vault has no secret at secret/data/x"] * 8
    now[0] = 4.9
    with pytest.raises(KeyUnavailable):
        cache.get("k", 10, lambda: "up", failure_ttl=5)  # still the cached failure: no new load
    now[0] = 5.1
    assert cached(cache, "k", lambda: "up", failure_ttl=5) == "up"


def credentials_policy(tmp_path, entries: str):
    (tmp_path / "a.yaml").write_text("access_key_id: AKIDA\nsecret_access_key: secret-a\n")
    (tmp_path / "a.yaml").chmod(0o600)
    (tmp_path / "b.yaml").write_text("access_key_id: AKIDB\nsecret_access_key: secret-b\n")
    (tmp_path / "b.yaml").chmod(0o600)
    return parse_policy(f"version: 1\nendpoints: []\ncredentials:\n{entries}\nrules: []\n", base_dir=tmp_path)


def test_a_declared_access_key_id_loads_only_its_own_credential(tmp_path):
    policy = credentials_policy(tmp_path, "  broken: {file: missing.yaml, access_key_id: AKIDX}\n"
                                          "  b: {file: b.yaml, access_key_id: AKIDB}")
    secrets = Secrets()
    assert blocking(lambda: secrets.credential_for(policy, "AKIDB")).secret_access_key == "secret-b"
    assert ("credential", policy.credentials["broken"]) not in secrets.cache._entries
    with pytest.raises(KeyUnavailable, match="cannot read credential 'broken' file"):
        blocking(lambda: secrets.credential_for(policy, "AKIDX"))


def test_a_broken_undeclared_credential_fails_only_requests_no_other_credential_serves(tmp_path):
    policy = credentials_policy(tmp_path, "  broken: {file: missing.yaml}\n  a: {file: a.yaml}")
    secrets = Secrets()
    assert blocking(lambda: secrets.credential_for(policy, "AKIDA")).secret_access_key == "secret-a"
    with pytest.raises(KeyUnavailable, match="no readable credential has access key id AKIDZ, and cannot read"):
        blocking(lambda: secrets.credential_for(policy, "AKIDZ"))


def test_a_declared_id_must_match_the_credential(tmp_path):
    policy = credentials_policy(tmp_path, "  a: {file: a.yaml, access_key_id: AKIDB}")
    with pytest.raises(KeyUnavailable, match="holds access_key_id AKIDA, not AKIDB as the policy declares"):
        read_credential(policy, "AKIDB")
