"""Key and credential sources (Vault KV v2, local files) behind one TTL cache with single-flight reads."""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Hashable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import yaml
from cryptography.hazmat.primitives import serialization

from keycourier import metrics
from keycourier.envelope import MasterKey
from keycourier.policy import Policy, SecretSpec, VaultSecretRef
from keycourier.vault import Vault, VaultError

KEY_BYTES = 32
T = TypeVar("T")
TRANSIENT_VAULT_OUTCOMES = frozenset({"unreachable", "sealed"})


class KeyUnavailable(Exception):
    """The key or credential cannot be had. The reason names it, never shows it."""

    def __init__(self, reason: str, *, transient: bool = False, missing: bool = False):
        super().__init__(reason)
        self.transient = transient  # the source could not be reached, as opposed to answering no
        self.missing = missing  # the source answered that there is no such secret (or version)


@dataclass(frozen=True)
class Key:
    name: str
    version: str
    material: bytes = field(repr=False)  # an RSA key's: its public half (DER), which names it and is no secret
    master: MasterKey | None = field(default=None, repr=False, compare=False)  # an RSA key pair (type: rsa)
    created: datetime | None = None  # when this version was written (Vault), or its file last changed

    @property
    def b64(self) -> str:
        return base64.b64encode(self.material).decode()

    @property
    def md5_b64(self) -> str:
        """The fingerprint S3 sees (x-amz-server-side-encryption-customer-key-MD5); safe to log."""
        return base64.b64encode(hashlib.md5(self.material).digest()).decode()

    @property
    def sha256_b64(self) -> str:
        """The fingerprint Azure keeps (x-ms-encryption-key-sha256); safe to log."""
        return base64.b64encode(hashlib.sha256(self.material).digest()).decode()


@dataclass(frozen=True)
class Credential:
    name: str
    access_key_id: str
    secret_access_key: str = field(repr=False)


def decode_key(name: str, text: str) -> bytes:
    try:
        material = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyUnavailable(f"key {name!r} is not valid base64") from None
    if len(material) != KEY_BYTES:
        raise KeyUnavailable(f"key {name!r} decodes to {len(material)} bytes, not {KEY_BYTES}")
    return material


def decode_secret(spec: SecretSpec, version: str, text: str, created: datetime | None = None) -> Key:
    """A key as its source holds it: base64 of 32 bytes, or (type: rsa) a PEM private key."""
    if spec.key_type != "rsa":
        return Key(spec.name, version, decode_key(spec.name, text), created=created)
    try:
        master = MasterKey.from_pem(spec.name, text.encode())
    except ValueError as exc:
        raise KeyUnavailable(str(exc)) from None  # names the key, never shows it
    public = master.private_key.public_key().public_bytes(serialization.Encoding.DER,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return Key(spec.name, version, public, master, created)


def generate_key_file(path: Path) -> None:
    """Writes a new random key, readable by its owner only; never overwrites."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(base64.b64encode(os.urandom(KEY_BYTES)).decode() + "\n")


def read_private_file(path: Path, what: str) -> str:
    """Refuses files that group or others may read: a key readable by everyone is no key."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyUnavailable(f"{what} file {path} is readable by group/others (mode {stat.S_IMODE(mode):o}); chmod 600 it")
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyUnavailable(f"cannot read {what} file {path}: {exc.strerror}") from None


class NotCached(Exception):
    """What a request needs is not in the cache yet. Its loads run off the caller's thread; wait for
    them (`wait()`, or await them as futures) and ask again. No request ever blocks another's."""

    def __init__(self, loads: list[Future]):
        super().__init__("secrets are being loaded")
        self.loads = loads

    def wait(self) -> None:
        futures.wait(self.loads)


def blocking(call: Callable[[], T]) -> T:
    """`call()`, waiting for whatever it needs to be loaded: for callers that may block (CLI, tests)."""
    while True:
        try:
            return call()
        except NotCached as missing:
            missing.wait()


@dataclass(frozen=True)
class _Entry:
    value: object | None
    error: KeyUnavailable | None
    fresh_until: float  # answered from the cache until then
    expires: float  # a value's own expiry; the stale grace counts from here


MIN_TTL = 1.0  # a value just loaded is served at least this long, so the request that waited for it gets it


class TtlCache:
    """Values live `ttl` seconds; failures `failure_ttl` seconds, so concurrent and repeated misses of
    one entry make one load and share its result, failure included. Loads run in a small pool of their
    own, never on the caller's thread. While the source is unreachable, an expired value is still
    served for `stale_for` seconds past its expiry (as Vault Agent's cache does): it is the same key,
    so this keeps encryption available, never weakens it. A definite no (not found, denied) is believed."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, loaders: int = 4):
        self.clock = clock
        self._entries: dict[Hashable, _Entry] = {}
        self._loading: dict[Hashable, Future] = {}
        self._guard = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=loaders, thread_name_prefix="keycourier-secrets")

    def get(self, entry: Hashable, ttl: float, load: Callable[[], object], *, stale_for: float = 0.0,
            failure_ttl: float = 0.0):
        """The cached value; raises the cached failure; else starts one load and raises NotCached."""
        with self._guard:
            cached = self._entries.get(entry)
            if cached and self.clock() < cached.fresh_until:
                if cached.error:
                    raise KeyUnavailable(str(cached.error), transient=cached.error.transient)
                metrics.child(metrics.KEY_CACHE, "hit").inc()
                return cached.value
            loading = self._loading.get(entry)
            if loading is None:
                loading = self._loading[entry] = Future()
                self._pool.submit(self._load, entry, loading, ttl, load, stale_for, failure_ttl)
        raise NotCached([loading])

    def _load(self, entry: Hashable, loading: Future, ttl: float, load: Callable[[], object], stale_for: float,
              failure_ttl: float) -> None:
        try:
            value = load()
        except KeyUnavailable as exc:
            self._store_failure(entry, exc, stale_for, failure_ttl)
        except Exception as exc:  # a bug in a loader must not leave its waiters hanging
            self._store_failure(entry, KeyUnavailable(f"unexpected {type(exc).__name__}"), stale_for, failure_ttl)
        else:
            metrics.child(metrics.KEY_CACHE, "miss").inc()
            now = self.clock()
            with self._guard:
                self._entries[entry] = _Entry(value, None, now + max(ttl, MIN_TTL), now + ttl)
        finally:
            with self._guard:
                self._loading.pop(entry, None)
            loading.set_result(None)

    def forget(self, *entries: Hashable) -> None:
        with self._guard:
            for entry in entries:
                self._entries.pop(entry, None)

    def _store_failure(self, entry: Hashable, exc: KeyUnavailable, stale_for: float, failure_ttl: float) -> None:
        now = self.clock()
        retry_at = now + max(failure_ttl, MIN_TTL)
        with self._guard:
            previous = self._entries.get(entry)
            if previous and previous.value is not None and exc.transient and now < previous.expires + stale_for:
                metrics.child(metrics.KEY_CACHE, "stale").inc()
                self._entries[entry] = _Entry(previous.value, None, min(retry_at, previous.expires + stale_for),
                                              previous.expires)
            else:
                self._entries[entry] = _Entry(None, exc, retry_at, now)


class Secrets:
    """Where keys and credentials come from: the policy says which source, this class reads it."""

    def __init__(self, vault_factory: Callable[[Policy], Vault] = lambda policy: Vault(policy.vault)):
        self.cache = TtlCache()
        self._vault_factory = vault_factory
        self._vaults: dict[object, Vault] = {}
        self._vault_lock = threading.Lock()

    def key(self, policy: Policy, spec: SecretSpec) -> Key:
        return self._cached(policy, ("key", spec), lambda: self._load_key(policy, spec))

    def credential_for(self, policy: Policy, access_key_id: str) -> Credential | None:
        """The credential with this access key id, or None if the policy lists none. A credential that
        declares its id is the only one loaded for it; the others are loaded (each on its own, a broken
        one failing only requests that may be signed with it) until one has the id."""
        declared = policy.credential_ids.get(access_key_id)
        if declared:
            return self.credential(policy, declared)
        pending: list[Future] = []
        broken: list[str] = []
        for spec in policy.credentials.values():
            if spec.declared_id:
                continue
            try:
                credential = self.credential(policy, spec)
            except NotCached as missing:
                pending += missing.loads
                continue
            except KeyUnavailable as exc:
                broken.append(str(exc))
                continue
            if credential.access_key_id == access_key_id:
                return credential
        if pending:
            raise NotCached(pending)
        if broken:
            raise KeyUnavailable(f"no readable credential has access key id {access_key_id}, and "
                                 f"{'; '.join(broken)}")
        return None

    def credential(self, policy: Policy, spec: SecretSpec) -> Credential:
        return self._cached(policy, ("credential", spec), lambda: self._load_credential(policy, spec))

    def _cached(self, policy: Policy, entry: Hashable, load: Callable[[], object]):
        return self.cache.get(entry, policy.key_cache_ttl, load, stale_for=policy.key_cache_stale_ttl,
                              failure_ttl=policy.key_cache_failure_ttl)

    def read_keys(self, policy: Policy, spec: SecretSpec) -> tuple[Key, ...]:
        """Every key an object under `spec` may have been written with: the write key first, then the older
        ones newest first (a file key's previous_files; a Vault key's versions back to min_version, skipping
        those Vault reports deleted or destroyed)."""
        return self._cached(policy, ("read keys", spec), lambda: self._load_read_keys(policy, spec))

    def _load_key(self, policy: Policy, spec: SecretSpec) -> Key:
        if spec.file:
            return self._file_key(spec, spec.file, "file")
        return self._vault_key(policy, spec, spec.vault)

    def _load_read_keys(self, policy: Policy, spec: SecretSpec) -> tuple[Key, ...]:
        write = self._load_key(policy, spec)
        if spec.file:
            return (write, *(self._file_key(spec, path, f"previous-{n}") for n, path in enumerate(spec.previous_files, 1)))
        # A key pinned to a version writes with it; the versions to read go back from the latest.
        pinned = spec.vault.version is not None
        latest = self._vault_key(policy, spec, replace(spec.vault, version=None)) if pinned else write
        older = []
        for version in range(int(latest.version[1:]) - 1, (spec.vault.min_version or 1) - 1, -1):
            try:
                older.append(self._vault_key(policy, spec, replace(spec.vault, version=version)))
            except KeyUnavailable as exc:
                if not exc.missing:
                    raise
        return (write, *(key for key in (latest, *older) if key.version != write.version))

    def _file_key(self, spec: SecretSpec, path: Path, version: str) -> Key:
        return decode_secret(spec, version, read_private_file(path, f"key {spec.name!r}"),
                             datetime.fromtimestamp(path.stat().st_mtime, timezone.utc))

    def _vault_key(self, policy: Policy, spec: SecretSpec, ref: VaultSecretRef) -> Key:
        fields, version, created = self._read_vault(policy, ref, f"key {spec.name!r}")
        if ref.field not in fields:
            raise KeyUnavailable(f"key {spec.name!r}: Vault secret {ref.api_path} has no field {ref.field!r}")
        return decode_secret(spec, f"v{version}", str(fields[ref.field]), created)

    def forget_key(self, policy: Policy, name: str) -> None:
        """Drops a key's cached versions: a provider said an object is under a version keycourier does not
        know (written by a replica that loaded it first, or rotated): the next request reads Vault again."""
        spec = policy.keys.get(name)
        if spec:
            self.cache.forget(("key", spec), ("read keys", spec))

    def _load_credential(self, policy: Policy, spec: SecretSpec) -> Credential:
        what = f"credential {spec.name!r}"
        if spec.file:
            try:
                fields = yaml.safe_load(read_private_file(spec.file, what))
            except yaml.YAMLError:
                raise KeyUnavailable(f"{what} file {spec.file} is not YAML") from None
        else:
            fields, _, _ = self._read_vault(policy, spec.vault, what)
        for key_id, secret in (("access_key_id", "secret_access_key"), ("account_name", "account_key")):
            if isinstance(fields, dict) and {key_id, secret} <= fields.keys():
                credential = Credential(spec.name, str(fields[key_id]), str(fields[secret]))
                if spec.declared_id not in (None, credential.access_key_id):
                    raise KeyUnavailable(f"{what} holds {key_id} {credential.access_key_id}, "
                                         f"not {spec.declared_id} as the policy declares")
                return credential
        raise KeyUnavailable(f"{what} needs the fields access_key_id and secret_access_key "
                             "(Azure: account_name and account_key)")

    def _read_vault(self, policy: Policy, ref: VaultSecretRef, what: str) -> tuple[dict, int, datetime | None]:
        try:
            return self._vault(policy).read_kv2(ref)
        except VaultError as exc:
            raise KeyUnavailable(f"{what}: {exc}", transient=exc.outcome in TRANSIENT_VAULT_OUTCOMES,
                                 missing=exc.outcome == "not_found") from None

    def vault_problem(self, policy: Policy) -> str | None:
        """Why Vault cannot serve this policy's keys, or None (also when it needs no Vault): from the last
        answers Vault gave (see check_vault), never a request of its own, so probes cost Vault nothing."""
        if not policy.needs_vault:
            return None
        try:
            return self._vault(policy).contact.problem(grace=policy.key_cache_ttl + policy.key_cache_stale_ttl)
        except VaultError as exc:
            return str(exc)

    def check_vault(self, policy: Policy, quiet_seconds: float) -> None:
        """Asks Vault's health if nothing has asked Vault anything for `quiet_seconds`: keeps vault_problem
        and keycourier_vault_up current when no request needs a key."""
        if policy.needs_vault:
            try:
                vault = self._vault(policy)
            except VaultError:
                return
            if vault.contact.quiet_for() >= quiet_seconds:
                vault.problem()

    def unreadable(self, policy: Policy) -> list[str]:
        """Reads every key and credential the policy names once, beside the cache (what requests load and
        share is untouched): why each one that cannot be had cannot. For warnings at start."""
        loads = [lambda spec=spec: self._load_key(policy, spec) for spec in policy.keys.values()]
        loads += [lambda spec=spec: self._load_credential(policy, spec) for spec in policy.credentials.values()]
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="keycourier-check") as pool:
            failures = [load.exception() for load in [pool.submit(load) for load in loads]]
        return [str(failure) if isinstance(failure, KeyUnavailable) else f"unexpected {type(failure).__name__}"
                for failure in failures if failure]

    def _vault(self, policy: Policy) -> Vault:
        # One client (and login) per Vault configuration, kept across policy reloads.
        with self._vault_lock:
            if policy.vault not in self._vaults:
                self._vaults[policy.vault] = self._vault_factory(policy)
            return self._vaults[policy.vault]
