"""policies.yaml: the model, its loader (every error names file and line), and rule matching."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from keycourier.dialects import PROVIDERS
from keycourier.hostnames import canonical_host

ACTIONS = ("encrypt", "passthrough", "deny")
KEY_TYPES = ("aes256", "rsa")  # rsa: a PEM private key, the master key pair of envelope encryption
ENVELOPES = ("oss-cse",)  # oss2 CryptoBucket's client-side encryption (docs/oss.md)
WRAPS = ("pkcs1v15", "oaep-sha1")
ACTIONS_BY_STRICTNESS = ("passthrough", "encrypt", "deny")
PLAINTEXT_READS = ("deny", "allow")
DEFAULT_KEY_CACHE_TTL = 300.0
DEFAULT_KEY_CACHE_STALE_TTL = 300.0
DEFAULT_KEY_CACHE_FAILURE_TTL = 5.0


class PolicyError(ValueError):
    """The first error in the file; `errors` holds every one found (one per entry at most), in line order."""

    def __init__(self, source: str, line: int, reason: str, others: tuple[PolicyError, ...] = ()):
        super().__init__(f"{source}:{line}: {reason}")
        self.source, self.line, self.reason = source, line, reason
        self.errors: list[PolicyError] = [self, *others]


@dataclass(frozen=True)
class VaultSecretRef:
    """A KV v2 secret: `path` as Vault's HTTP API names it, `<mount>/data/<secret path>`."""

    mount: str
    path: str
    field: str
    version: int | None = None  # pinned: writes use this version instead of the latest
    min_version: int | None = None  # the oldest version reads still accept (None: all)

    @property
    def api_path(self) -> str:
        return f"{self.mount}/data/{self.path}"


@dataclass(frozen=True)
class SecretSpec:
    """Where a named key or credential is read from: a Vault secret or a local file."""

    name: str
    line: int
    vault: VaultSecretRef | None = None
    file: Path | None = None
    previous_files: tuple[Path, ...] = ()  # a file key's older keys, newest first: reads still accept them
    declared_id: str | None = None  # a credential's access key id (Azure: account name), given in the policy
    key_type: str = "aes256"  # a key's: one of KEY_TYPES


@dataclass(frozen=True)
class VaultAuth:
    method: Literal["token", "approle", "kubernetes"]
    token_file: Path | None = None  # token: a Vault token; kubernetes: the service account JWT
    role_id: str | None = None
    secret_id_file: Path | None = None
    role: str | None = None
    mount: str | None = None  # where the auth method is enabled, if not at its default path


KUBERNETES_SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


@dataclass(frozen=True)
class VaultConfig:
    addr: str | None = None
    namespace: str | None = None
    ca_cert: Path | None = None
    auth: VaultAuth = VaultAuth(method="token")


@dataclass(frozen=True)
class Endpoint:
    host: str  # glob over "host" or "host:port"
    provider: str
    line: int
    region: str | None = None  # signing region, where the host name does not tell it

    def matches(self, host: str, port: int) -> bool:
        """`host` in canonical form (keycourier.hostnames)."""
        pattern = glob_regex(self.host)
        return bool(pattern.fullmatch(f"{host}:{port}") or (":" not in self.host and pattern.fullmatch(host)))

    def takes_port(self, port: int) -> bool:
        return ":" not in self.host or bool(glob_regex(self.host.rpartition(":")[2]).fullmatch(str(port)))


OSS_SSE = ("AES256", "SM4", "KMS")
ENVELOPE_FIELDS = ("envelope", "wrap", "matdesc")
# A credential may say whose it is, so a request loads only the credential it is signed with.
CREDENTIAL_IDS = ("access_key_id", "account_name")


@dataclass(frozen=True)
class Rule:
    provider: str
    bucket: str  # S3 and OSS bucket, Azure container
    prefix: str
    action: Literal["encrypt", "passthrough", "deny"]
    key: str | None
    line: int
    account: str = "*"  # Azure storage account
    oss_sse: str | None = None  # OSS has no customer keys: its own encryption, by algorithm
    kms_key_id: str | None = None
    plaintext_reads: Literal["deny", "allow"] = "deny"  # objects stored before the bucket was encrypted
    given_name: str | None = None  # the rule's `name:`
    envelope: str | None = None  # encrypted by keycourier itself, in this format, under the RSA key `key`
    wrap: str = "pkcs1v15"  # envelope: how the master key wraps each object's data key
    matdesc: tuple[tuple[str, str], ...] = ()  # envelope: the material description written with each object

    @property
    def name(self) -> str:
        """Stable, policy-derived label for logs and metrics (never client input)."""
        return self.given_name or f"rule{self.line}"

    def matches(self, provider: str, bucket: str | None, object_key: str | None, account: str | None = None) -> bool:
        if not self.may_cover(provider, account):
            return False
        if bucket is None:
            return self.bucket == "*"
        if not glob_regex(self.bucket).fullmatch(bucket):
            return False
        # Bucket-level requests (listings, bucket calls) match on the bucket alone.
        return object_key is None or object_key.startswith(self.prefix)

    def may_cover(self, provider: str, account: str | None) -> bool:
        return self.provider in ("*", provider) and (account is None or bool(glob_regex(self.account).fullmatch(account)))


@dataclass(frozen=True)
class Policy:
    source: str
    vault: VaultConfig | None
    endpoints: tuple[Endpoint, ...]
    keys: dict[str, SecretSpec]
    credentials: dict[str, SecretSpec]
    rules: tuple[Rule, ...]
    key_cache_ttl: float = DEFAULT_KEY_CACHE_TTL
    key_cache_stale_ttl: float = DEFAULT_KEY_CACHE_STALE_TTL
    key_cache_failure_ttl: float = DEFAULT_KEY_CACHE_FAILURE_TTL
    # Translation to OSS: the KMS key id to use for a customer key, by the key's base64 SHA-256.
    oss_kms_key_ids: dict[str, str] = field(default_factory=dict)
    needs_vault: bool = field(init=False)
    credential_ids: dict[str, SecretSpec] = field(init=False)  # credentials by their declared access key id

    def __post_init__(self) -> None:
        uses_vault = any(s.vault for s in (*self.keys.values(), *self.credentials.values()))
        object.__setattr__(self, "needs_vault", uses_vault)
        object.__setattr__(self, "credential_ids", {s.declared_id: s for s in self.credentials.values() if s.declared_id})

    def endpoint_for(self, host: str, port: int) -> Endpoint | None:
        return next((e for e in self.endpoints if e.matches(host, port)), None)

    def rule_for(self, provider: str, bucket: str | None, object_key: str | None, account: str | None = None) -> Rule | None:
        """First match wins."""
        return next((r for r in self.rules if r.matches(provider, bucket, object_key, account)), None)

    def strictest_rule_for(self, provider: str, bucket: str | None, account: str | None = None) -> Rule | None:
        """The strictest rule any object of `bucket` (None: of any bucket of the account) falls under, or
        None when some of its objects fall under no rule. For requests that name objects in their body."""
        reachable = []
        for rule in self.rules:
            if not rule.may_cover(provider, account):
                continue
            if bucket is None or glob_regex(rule.bucket).fullmatch(bucket):
                reachable.append(rule)
                if rule.prefix == "" and (bucket is not None or rule.bucket == "*"):
                    return max(reachable, key=lambda r: ACTIONS_BY_STRICTNESS.index(r.action))
        return None

    def summary(self) -> list[str]:
        lines = []
        for rule in self.rules:
            where = f"{rule.provider}:{rule.bucket}/{rule.prefix}*"
            key = f" with key {rule.key}" if rule.key else (f" with OSS {rule.oss_sse}" if rule.oss_sse else "")
            lines.append(f"{rule.name} (line {rule.line}): {where} -> {rule.action}{key}")
        return lines


_SHA256_B64 = re.compile(r"[A-Za-z0-9+/]{43}=")
_RULE_NAME = re.compile(r"[a-z0-9_-]{1,64}")
_GLOB_CHARS = re.compile(r"^[A-Za-z0-9._*?:-]*$")


@functools.lru_cache(maxsize=1024)  # matched on every request: compile each policy glob once
def glob_regex(glob: str) -> re.Pattern[str]:
    """Our globs know only `*` (any run of characters) and `?` (one character)."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob), re.IGNORECASE)


def is_glob(text: str) -> bool:
    return "*" in text or "?" in text


# --- loading -------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """Keeps the line of every mapping and refuses duplicate keys, which plain YAML lets pass."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _NodeError(key_node.start_mark.line + 1, f"duplicate name {key!r} (first at line {seen[key]})")
            seen[key] = key_node.start_mark.line + 1
        mapping = _Mapping(super().construct_mapping(node, deep=True))
        mapping.line = node.start_mark.line + 1
        mapping.lines = seen
        return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, lambda loader, node: loader.construct_mapping(node))


class _Mapping(dict):
    line: int = 0
    lines: dict[str, int]


class _NodeError(Exception):
    def __init__(self, line: int, reason: str):
        self.line, self.reason = line, reason


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(str(path), 0, f"cannot read policy file: {exc.strerror}") from None
    return parse_policy(text, source=str(path), base_dir=path.parent)


def parse_policy(text: str, *, source: str = "<policy>", base_dir: Path = Path(".")) -> Policy:
    reader = _PolicyReader(base_dir)
    try:
        document = yaml.load(text, Loader=_Loader)
        policy = reader.policy(document, source)
    except _NodeError as exc:
        reader.errors.append(exc)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise PolicyError(source, mark.line + 1 if mark else 0, f"invalid YAML: {exc.problem}") from None
    if reader.errors:
        first, *others = sorted(reader.errors, key=lambda error: error.line)
        raise PolicyError(source, first.line, first.reason,
                          tuple(PolicyError(source, error.line, error.reason) for error in others)) from None
    return policy


class _PolicyReader:
    def __init__(self, base_dir: Path):
        self.base_dir = base_dir
        self.declared_ids: dict[str, str] = {}
        self.rule_names: dict[str, int] = {}
        # Errors are collected per entry (endpoint, key, credential, rule), so one run reports them all.
        self.errors: list[_NodeError] = []
        self.broken_keys: set[str] = set()  # keys with errors: rules naming them are not also reported

    def each(self, read, entries) -> list:
        """read(entry) for every entry; an entry with an error is recorded and left out."""
        results = []
        for entry in entries:
            try:
                results.append(read(entry))
            except _NodeError as exc:
                self.errors.append(exc)
        return results

    def policy(self, document: Any, source: str) -> Policy:
        top = self.mapping(document, "policy", 1, required={"version", "endpoints", "rules"},
                           optional={"vault", "keys", "credentials", "key_cache_ttl", "key_cache_stale_ttl",
                                     "key_cache_failure_ttl", "oss_kms_key_ids"})
        if top["version"] != 1:
            raise _NodeError(top.lines["version"], f"unsupported version {top['version']!r} (this keycourier reads version 1)")
        keys = self.named(top, "keys", self.key)
        credentials = self.named(top, "credentials", self.credential)
        ttl = self.seconds(top, "key_cache_ttl", DEFAULT_KEY_CACHE_TTL)
        stale_ttl = self.seconds(top, "key_cache_stale_ttl", DEFAULT_KEY_CACHE_STALE_TTL)
        failure_ttl = self.seconds(top, "key_cache_failure_ttl", DEFAULT_KEY_CACHE_FAILURE_TTL)
        return Policy(
            source=source,
            vault=self.vault(top["vault"], top.lines["vault"]) if "vault" in top else None,
            endpoints=tuple(self.each(lambda e: self.endpoint(e, top.lines["endpoints"]), self.sequence(top, "endpoints"))),
            keys=keys,
            credentials=credentials,
            rules=tuple(self.each(lambda r: self.rule(r, top.lines["rules"], keys), self.sequence(top, "rules"))),
            key_cache_ttl=ttl,
            key_cache_stale_ttl=stale_ttl,
            key_cache_failure_ttl=failure_ttl,
            oss_kms_key_ids=self.kms_key_ids(top),
        )

    def seconds(self, top: _Mapping, name: str, default: float) -> float:
        value = top.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise _NodeError(top.lines.get(name, top.line), f"{name} must be a number of seconds >= 0")
        return float(value)

    def kms_key_ids(self, top: _Mapping) -> dict[str, str]:
        if "oss_kms_key_ids" not in top:
            return {}
        mapping = top["oss_kms_key_ids"]
        if not isinstance(mapping, _Mapping):
            raise _NodeError(top.lines["oss_kms_key_ids"], "oss_kms_key_ids must map key SHA-256 fingerprints to KMS key ids")
        for fingerprint, kms_key_id in mapping.items():
            if not isinstance(fingerprint, str) or not _SHA256_B64.fullmatch(fingerprint):
                raise _NodeError(mapping.lines[fingerprint], f"{fingerprint!r} is not a base64 SHA-256 (44 characters ending in '=')")
            if not isinstance(kms_key_id, str) or not kms_key_id:
                raise _NodeError(mapping.lines[fingerprint], "the KMS key id must be a non-empty string")
        return dict(mapping)

    # shapes

    def mapping(self, value: Any, what: str, line: int, *, required=frozenset(), optional=frozenset()) -> _Mapping:
        if not isinstance(value, _Mapping):
            raise _NodeError(line, f"{what} must be a mapping")
        for name in value:
            if name not in required and name not in optional:
                allowed = ", ".join(sorted({*required, *optional}))
                raise _NodeError(value.lines[name], f"unknown field {name!r} in {what} (allowed: {allowed})")
        for name in sorted(required):
            if name not in value:
                raise _NodeError(value.line, f"{what} is missing required field {name!r}")
        return value

    def sequence(self, parent: _Mapping, name: str) -> list:
        value = parent[name]
        if not isinstance(value, list):
            raise _NodeError(parent.lines[name], f"{name} must be a list")
        return value

    def named(self, parent: _Mapping, name: str, read) -> dict:
        if name not in parent:
            return {}
        entries = parent[name]
        if not isinstance(entries, _Mapping):
            raise _NodeError(parent.lines[name], f"{name} must be a mapping of names")
        for entry in entries:
            if not isinstance(entry, str):
                raise _NodeError(entries.lines[entry], f"{name}: name {entry!r} must be a string")
        def read_one(entry):
            return entry, read(entry, entries[entry], entries.lines[entry])

        read_names = self.each(read_one, entries)
        if name == "keys":
            self.broken_keys |= set(entries) - {entry for entry, _ in read_names}
        return dict(read_names)

    def string(self, parent: _Mapping, name: str, *, default: str | None = None) -> str:
        value = parent.get(name, default)
        if not isinstance(value, str) or not value:
            raise _NodeError(parent.lines.get(name, parent.line), f"{name} must be a non-empty string")
        return value

    def path(self, parent: _Mapping, name: str) -> Path:
        # Absolute, but symlinks not resolved: Kubernetes replaces a Secret's, ConfigMap's or projected token's
        # files by swapping `..data` to a new directory and deleting the old one, so a resolved path goes stale.
        return (self.base_dir / self.string(parent, name)).absolute()

    # sections

    def vault(self, value: Any, line: int) -> VaultConfig:
        section = self.mapping(value, "vault", line, optional={"addr", "namespace", "ca_cert", "auth"})
        auth = VaultAuth(method="token")
        if "auth" in section:
            auth = self.vault_auth(section["auth"], section.lines["auth"])
        return VaultConfig(
            addr=self.string(section, "addr") if "addr" in section else None,
            namespace=self.string(section, "namespace") if "namespace" in section else None,
            ca_cert=self.path(section, "ca_cert") if "ca_cert" in section else None,
            auth=auth,
        )

    # the fields each Vault auth method takes, beside `method` and `mount`
    _AUTH_FIELDS = {
        "token": (set(), {"token_file"}),
        "approle": ({"role_id", "secret_id_file"}, set()),
        "kubernetes": ({"role"}, {"token_file"}),
    }

    def vault_auth(self, value: Any, line: int) -> VaultAuth:
        spec = self.mapping(value, "vault.auth", line, required={"method"},
                            optional={"mount", "token_file", "role_id", "secret_id_file", "role"})
        method = spec["method"]
        if method not in self._AUTH_FIELDS:
            raise _NodeError(spec.lines["method"], f"unknown vault auth method {method!r} ({', '.join(self._AUTH_FIELDS)})")
        required, optional = self._AUTH_FIELDS[method]
        self.mapping(spec, f"vault.auth ({method})", spec.line, required={"method", *required},
                     optional={"mount", *optional} if method != "token" else optional)
        token_file = self.path(spec, "token_file") if "token_file" in spec else None
        return VaultAuth(
            method,
            token_file=token_file or (KUBERNETES_SERVICE_ACCOUNT_TOKEN if method == "kubernetes" else None),
            role_id=self.string(spec, "role_id") if "role_id" in spec else None,
            secret_id_file=self.path(spec, "secret_id_file") if "secret_id_file" in spec else None,
            role=self.string(spec, "role") if "role" in spec else None,
            mount=self.string(spec, "mount") if "mount" in spec else None,
        )

    def secret_source(self, kind: str, name: str, value: Any, line: int, *, entry_fields: set[str],
                      vault_fields: set[str]) -> tuple[SecretSpec, _Mapping]:
        """A key's or credential's source (Vault KV v2 or a file), and its entry for the fields of its kind."""
        entry = self.mapping(value, f"{kind} {name!r}", line, optional={"vault", "file", *entry_fields})
        if ("vault" in entry) == ("file" in entry):
            raise _NodeError(line, f"{kind} {name!r} needs exactly one source: vault or file")
        if "file" in entry:
            return SecretSpec(name, line, file=self.path(entry, "file")), entry
        ref = self.mapping(entry["vault"], f"{kind} {name!r} vault", entry.lines["vault"], required={"path"},
                           optional=vault_fields)
        api_path = self.string(ref, "path")
        mount, sep, secret_path = api_path.strip("/").partition("/data/")
        if not sep or not mount or not secret_path:
            raise _NodeError(ref.lines["path"], f"vault path {api_path!r} is not a KV v2 path of the form <mount>/data/<path>")
        version, min_version = self.positive_int(ref, "version"), self.positive_int(ref, "min_version")
        if version and min_version and min_version > version:
            raise _NodeError(ref.lines["min_version"], f"min_version {min_version} is newer than the pinned version {version}")
        field_name = self.string(ref, "field", default="key") if "field" in vault_fields else ""
        return SecretSpec(name, line, vault=VaultSecretRef(mount, secret_path, field_name, version, min_version)), entry

    def positive_int(self, parent: _Mapping, name: str) -> int | None:
        value = parent.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise _NodeError(parent.lines[name], f"vault {name} must be a positive integer")
        return value

    def key(self, name: str, value: Any, line: int) -> SecretSpec:
        spec, entry = self.secret_source("key", name, value, line, entry_fields={"previous_files", "type"},
                                         vault_fields={"field", "version", "min_version"})
        key_type = entry.get("type", "aes256")
        if key_type not in KEY_TYPES:
            raise _NodeError(entry.lines["type"], f"key type must be one of {', '.join(KEY_TYPES)}, not {key_type!r}")
        spec = replace(spec, key_type=key_type)
        if "previous_files" not in entry:
            return spec
        if spec.vault:
            raise _NodeError(entry.lines["previous_files"], "previous_files goes with a file key (a Vault key keeps "
                                                            "its old versions: see min_version)")
        files = entry["previous_files"]
        if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
            raise _NodeError(entry.lines["previous_files"], "previous_files must be a list of key file paths, newest first")
        return replace(spec, previous_files=tuple((self.base_dir / f).absolute() for f in files))

    def credential(self, name: str, value: Any, line: int) -> SecretSpec:
        spec, entry = self.secret_source("credential", name, value, line, entry_fields=set(CREDENTIAL_IDS),
                                         vault_fields={"version"})
        declared = [self.string(entry, id_field) for id_field in CREDENTIAL_IDS if id_field in entry]
        if len(declared) > 1:
            raise _NodeError(line, f"credential {name!r} declares both access_key_id and account_name: give one")
        if not declared:
            return spec
        if declared[0] in self.declared_ids:
            raise _NodeError(line, f"credential {name!r}: access key id {declared[0]} is declared by "
                                   f"credential {self.declared_ids[declared[0]]!r} too")
        self.declared_ids[declared[0]] = name
        return replace(spec, declared_id=declared[0])

    def endpoint(self, value: Any, line: int) -> Endpoint:
        entry = self.mapping(value, "endpoint", line, required={"host", "provider"}, optional={"region"})
        glob = self.glob(entry, "host")
        host, colon, port = glob.rpartition(":") if ":" in glob else (glob, "", "")
        if not is_glob(host):
            host = canonical_host(host)  # matched against canonical names: 127.0.0.1, not 127.1
        return Endpoint(host=f"{host}{colon}{port}", provider=self.provider(entry, allow_any=False), line=entry.line,
                        region=self.string(entry, "region") if "region" in entry else None)

    def rule(self, value: Any, line: int, keys: dict[str, SecretSpec]) -> Rule:
        entry = self.mapping(value, "rule", line, required={"match", "action"},
                             optional={"name", "key", "oss_sse", "kms_key_id", "plaintext_reads", *ENVELOPE_FIELDS})
        match = self.mapping(entry["match"], "rule match", entry.lines["match"], required={"provider"},
                             optional={"bucket", "prefix", "account"})
        provider = self.provider(match, allow_any=True)
        action = entry["action"]
        if action not in ACTIONS:
            raise _NodeError(entry.lines["action"], f"unknown action {action!r} ({', '.join(ACTIONS)})")
        key, oss_sse, kms_key_id = entry.get("key"), entry.get("oss_sse"), entry.get("kms_key_id")
        if action == "encrypt":
            self.encryption(entry, provider, keys)
        else:
            for name in ("key", "oss_sse", "kms_key_id", "plaintext_reads", *ENVELOPE_FIELDS):
                if name in entry:
                    raise _NodeError(entry.lines[name], f"a {action} rule takes no {name}")
        if "account" in match and provider not in ("azure", "*"):
            raise _NodeError(match.lines["account"], "account applies to azure rules only")
        prefix = match.get("prefix", "")
        if not isinstance(prefix, str):
            raise _NodeError(match.lines["prefix"], "prefix must be a string")
        given_name = self.rule_name(entry)
        return Rule(
            provider=provider,
            bucket=self.glob(match, "bucket") if "bucket" in match else "*",
            prefix=prefix,
            action=action,
            key=key,
            line=entry.line,
            account=self.glob(match, "account") if "account" in match else "*",
            oss_sse=oss_sse,
            kms_key_id=kms_key_id,
            plaintext_reads=self.plaintext_reads(entry),
            given_name=given_name,
            **self.envelope(entry),
        )

    def plaintext_reads(self, entry: _Mapping) -> str:
        value = entry.get("plaintext_reads", "deny")
        if value not in PLAINTEXT_READS:
            raise _NodeError(entry.lines["plaintext_reads"], f"plaintext_reads must be deny or allow, not {value!r}")
        return value

    def rule_name(self, entry: _Mapping) -> str | None:
        """A rule's `name:`: its label in metrics and the audit log, so a fixed, unique, small vocabulary."""
        if "name" not in entry:
            return None
        name, line = entry["name"], entry.lines["name"]
        if not isinstance(name, str) or not _RULE_NAME.fullmatch(name):
            raise _NodeError(line, f"rule name {name!r} must be 1-64 of a-z, 0-9, '_' and '-'")
        if name in self.rule_names:
            raise _NodeError(line, f"rule name {name!r} is taken by the rule at line {self.rule_names[name]}")
        self.rule_names[name] = line
        return name

    def encryption(self, entry: _Mapping, provider: str, keys: dict[str, SecretSpec]) -> None:
        """An encrypt rule names a key (S3, Azure), an OSS algorithm (OSS), or both (any provider); an envelope
        rule names an RSA key."""
        if "envelope" in entry:
            return self.envelope_encryption(entry, provider, keys)
        for name in ENVELOPE_FIELDS:
            if name in entry:
                raise _NodeError(entry.lines[name], f"{name} goes with envelope: {ENVELOPES[0]}")
        if provider != "oss":
            spec = self.named_key(entry, keys, "an encrypt rule needs a key")
            if spec is not None and spec.key_type == "rsa":
                raise _NodeError(entry.lines["key"], f"key {entry['key']!r} is an RSA key pair: only envelope rules take it")
        if provider == "oss" and "key" in entry:
            raise _NodeError(entry.lines["key"], "OSS takes no customer key: give oss_sse (AES256, SM4 or KMS)")
        if provider in ("oss", "*") and ("oss_sse" in entry or provider == "oss"):
            if entry.get("oss_sse") not in OSS_SSE:
                raise _NodeError(entry.lines.get("oss_sse", entry.line), f"an OSS encrypt rule needs oss_sse: one of {', '.join(OSS_SSE)}")
        elif "oss_sse" in entry:
            raise _NodeError(entry.lines["oss_sse"], "oss_sse applies to oss rules only")
        if "kms_key_id" in entry and entry.get("oss_sse") != "KMS":
            raise _NodeError(entry.lines["kms_key_id"], "kms_key_id goes with oss_sse: KMS")

    def envelope_encryption(self, entry: _Mapping, provider: str, keys: dict[str, SecretSpec]) -> None:
        """Envelope encryption (OSS client-side encryption): an RSA master key, how it wraps, and a description."""
        if entry["envelope"] not in ENVELOPES:
            raise _NodeError(entry.lines["envelope"], f"envelope must be one of {', '.join(ENVELOPES)}")
        if provider != "oss":
            raise _NodeError(entry.lines["envelope"], f"envelope: {entry['envelope']} is OSS client-side encryption: "
                                                      "the rule must match provider: oss")
        for name in ("oss_sse", "kms_key_id"):
            if name in entry:
                raise _NodeError(entry.lines[name], f"an envelope rule takes no {name}: keycourier encrypts the data itself")
        spec = self.named_key(entry, keys, "an envelope rule needs a key: an RSA key pair (type: rsa)")
        if spec is not None and spec.key_type != "rsa":
            raise _NodeError(entry.lines["key"], f"key {entry['key']!r} must be an RSA key pair (type: rsa) for envelope encryption")
        if entry.get("wrap", WRAPS[0]) not in WRAPS:
            raise _NodeError(entry.lines["wrap"], f"wrap must be one of {', '.join(WRAPS)}")
        matdesc = entry.get("matdesc", {})
        if not isinstance(matdesc, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in matdesc.items()):
            raise _NodeError(entry.lines["matdesc"], "matdesc must map names to strings")

    def named_key(self, entry: _Mapping, keys: dict[str, SecretSpec], needed: str) -> SecretSpec | None:
        """The key a rule names; None for a key whose own entry was refused already (one error is enough)."""
        if "key" not in entry:
            raise _NodeError(entry.line, needed)
        if entry["key"] in self.broken_keys:
            return None
        if not isinstance(entry["key"], str) or entry["key"] not in keys:
            known = ", ".join(sorted(keys)) or "none defined"
            raise _NodeError(entry.lines["key"], f"unknown key name {entry['key']!r} (keys: {known})")
        return keys[entry["key"]]

    def envelope(self, entry: _Mapping) -> dict[str, Any]:
        if "envelope" not in entry:
            return {}
        return {"envelope": entry["envelope"], "wrap": entry.get("wrap", WRAPS[0]),
                "matdesc": tuple(entry.get("matdesc", {}).items())}

    def provider(self, entry: _Mapping, *, allow_any: bool) -> str:
        provider = entry["provider"]
        allowed = PROVIDERS + (("*",) if allow_any else ())
        if provider not in allowed:
            raise _NodeError(entry.lines["provider"], f"unknown provider {provider!r} ({', '.join(allowed)})")
        return provider

    def glob(self, entry: _Mapping, name: str) -> str:
        value = self.string(entry, name)
        if not _GLOB_CHARS.fullmatch(value):
            raise _NodeError(entry.lines[name], f"bad glob {value!r} in {name}: only letters, digits, '.', '-', '_', ':' and the wildcards '*' and '?' are allowed")
        return value


class PolicyFile:
    """The policy in force, reloaded when its file changes. An invalid edit is refused and the
    previous policy stays. Follows symlinks, so Kubernetes' ConfigMap swaps are seen too."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._stamp = self._stat()
        self._pending: tuple | None = None
        self.current = load_policy(self.path)

    def _stat(self) -> tuple | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def reload_if_changed(self) -> PolicyError | bool:
        """Called periodically. A change is loaded once the file has stayed the same for one call
        (debounce: an editor or a copy may still be writing it). True when a new policy took effect,
        False when there was nothing to do, the error when the new file was refused."""
        stamp = self._stat()
        if stamp == self._stamp:
            self._pending = None
            return False
        if stamp != self._pending:
            self._pending = stamp
            return False
        self._stamp, self._pending = stamp, None
        try:
            self.current = load_policy(self.path)
        except PolicyError as exc:
            return exc
        return True
