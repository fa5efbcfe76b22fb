import base64
import threading
import time

import pytest

from keycourier.keys import KeyUnavailable, Secrets, TtlCache, decode_key, generate_key_file
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


def test_file_key_decodes_to_32_bytes_with_fingerprints(tmp_path):
    policy = policy_with_key_file(tmp_path)
    key = Secrets().key(policy, policy.keys["dev"])
    assert key.material == KEY and key.version == "file"
    assert key.md5_b64 == "tP/LI3N87DFaSk0aoqYgzg=="  # base64(md5(bytes(range(32)))), computed with openssl
    assert KEY.hex() not in repr(key) and base64.b64encode(KEY).decode() not in repr(key)


def test_key_file_readable_by_others_is_refused(tmp_path):
    policy = policy_with_key_file(tmp_path, mode=0o644)
    with pytest.raises(KeyUnavailable, match=r"readable by group/others \(mode 644\)"):
        Secrets().key(policy, policy.keys["dev"])


@pytest.mark.parametrize("content, reason", [
    ("not base64!", "not valid base64"),
    (base64.b64encode(b"short").decode(), "decodes to 5 bytes, not 32"),
])
def test_bad_key_names_the_key_never_shows_it(tmp_path, content, reason):
    policy = policy_with_key_file(tmp_path, content=content)
    with pytest.raises(KeyUnavailable) as raised:
        Secrets().key(policy, policy.keys["dev"])
    assert reason in str(raised.value) and "'dev'" in str(raised.value)
    assert content not in str(raised.value)


def test_credentials_are_found_by_access_key_id(tmp_path):
    policy = policy_with_key_file(tmp_path)
    secrets = Secrets()
    assert secrets.credential_for(policy, "AKIDEXAMPLE").secret_access_key == "s3cr3t"
    assert secrets.credential_for(policy, "AKIDOTHER") is None
    assert "s3cr3t" not in repr(secrets.credential_for(policy, "AKIDEXAMPLE"))


def test_keygen_writes_owner_only_and_never_overwrites(tmp_path):
    path = tmp_path / "keys" / "new.key"
    generate_key_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(decode_key("new", path.read_text())) == 32
    with pytest.raises(FileExistsError):
        generate_key_file(path)


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
    threads = [threading.Thread(target=lambda: results.append(cache.get("k", 10, slow_load))) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    release.set()
    for thread in threads:
        thread.join()
    assert results == ["value"] * 8 and len(loads) == 1
    now[0] = 9.9
    cache.get("k", 10, slow_load)
    assert len(loads) == 1
    now[0] = 10.1
    cache.get("k", 10, slow_load)
    assert len(loads) == 2


def test_failed_load_is_not_cached():
    cache = TtlCache()
    with pytest.raises(KeyUnavailable):
        cache.get("k", 10, lambda: (_ for _ in ()).throw(KeyUnavailable("down")))
    assert cache.get("k", 10, lambda: "up") == "up"
