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
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from keycourier import metrics
from keycourier.policy import Policy, SecretSpec, VaultSecretRef
from keycourier.vault import Vault, VaultError

KEY_BYTES = 32
TRANSIENT_VAULT_OUTCOMES = frozenset({"unreachable", "sealed"})


class KeyUnavailable(Exception):
    """The key or credential cannot be had. The reason names it, never shows it."""

    def __init__(self, reason: str, *, transient: bool = False):
        super().__init__(reason)
        self.transient = transient  # the source could not be reached, as opposed to answering no


@dataclass(frozen=True)
class Key:
    name: str
    version: str
    material: bytes = field(repr=False)

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


class TtlCache:
    """Values live `ttl` seconds. Concurrent misses for one entry make one load, not many.
    While the source is unreachable, an expired value is still served for `stale_for` seconds (as Vault
    Agent's cache does): it is the same key, so this keeps encryption available, never weakens it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._entries: dict[Hashable, tuple[float, object]] = {}
        self._locks: dict[Hashable, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, entry: Hashable, ttl: float, load: Callable[[], object], stale_for: float = 0.0):
        with self._guard:
            lock = self._locks.setdefault(entry, threading.Lock())
        with lock:
            cached = self._entries.get(entry)
            if cached and self.clock() < cached[0]:
                metrics.KEY_CACHE.labels("hit").inc()
                return cached[1]
            try:
                value = load()
            except KeyUnavailable as exc:
                if cached and exc.transient and self.clock() < cached[0] + stale_for:
                    metrics.KEY_CACHE.labels("stale").inc()
                    return cached[1]
                raise
            metrics.KEY_CACHE.labels("miss").inc()
            self._entries[entry] = (self.clock() + ttl, value)
            return value


class Secrets:
    """Where keys and credentials come from: the policy says which source, this class reads it."""

    def __init__(self, vault_factory: Callable[[Policy], Vault] = lambda policy: Vault(policy.vault)):
        self.cache = TtlCache()
        self._vault_factory = vault_factory
        self._vaults: dict[object, Vault] = {}
        self._vault_lock = threading.Lock()

    def key(self, policy: Policy, spec: SecretSpec) -> Key:
        return self.cache.get(("key", spec), policy.key_cache_ttl, lambda: self._load_key(policy, spec),
                              policy.key_cache_stale_ttl)

    def credential_for(self, policy: Policy, access_key_id: str) -> Credential | None:
        """The credential with this access key id, or None if the policy lists none."""
        for spec in policy.credentials.values():
            credential = self.cache.get(("credential", spec), policy.key_cache_ttl,
                                        lambda spec=spec: self._load_credential(policy, spec), policy.key_cache_stale_ttl)
            if credential.access_key_id == access_key_id:
                return credential
        return None

    def _load_key(self, policy: Policy, spec: SecretSpec) -> Key:
        if spec.file:
            return Key(spec.name, "file", decode_key(spec.name, read_private_file(spec.file, f"key {spec.name!r}")))
        fields, version = self._read_vault(policy, spec.vault, f"key {spec.name!r}")
        if spec.vault.field not in fields:
            raise KeyUnavailable(f"key {spec.name!r}: Vault secret {spec.vault.api_path} has no field {spec.vault.field!r}")
        return Key(spec.name, f"v{version}", decode_key(spec.name, str(fields[spec.vault.field])))

    def _load_credential(self, policy: Policy, spec: SecretSpec) -> Credential:
        what = f"credential {spec.name!r}"
        if spec.file:
            try:
                fields = yaml.safe_load(read_private_file(spec.file, what))
            except yaml.YAMLError:
                raise KeyUnavailable(f"{what} file {spec.file} is not YAML") from None
        else:
            fields, _ = self._read_vault(policy, spec.vault, what)
        for key_id, secret in (("access_key_id", "secret_access_key"), ("account_name", "account_key")):
            if isinstance(fields, dict) and {key_id, secret} <= fields.keys():
                return Credential(spec.name, str(fields[key_id]), str(fields[secret]))
        raise KeyUnavailable(f"{what} needs the fields access_key_id and secret_access_key "
                             "(Azure: account_name and account_key)")

    def _read_vault(self, policy: Policy, ref: VaultSecretRef, what: str) -> tuple[dict, int]:
        try:
            return self._vault(policy).read_kv2(ref)
        except VaultError as exc:
            raise KeyUnavailable(f"{what}: {exc}", transient=exc.outcome in TRANSIENT_VAULT_OUTCOMES) from None

    def vault_problem(self, policy: Policy) -> str | None:
        """Why Vault cannot serve this policy's keys right now, or None (also when it needs no Vault)."""
        if not policy.needs_vault:
            return None
        try:
            return self._vault(policy).problem()
        except VaultError as exc:
            return str(exc)

    def _vault(self, policy: Policy) -> Vault:
        # One client (and login) per Vault configuration, kept across policy reloads.
        with self._vault_lock:
            if policy.vault not in self._vaults:
                self._vaults[policy.vault] = self._vault_factory(policy)
            return self._vaults[policy.vault]
