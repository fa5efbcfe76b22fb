"""A Vault-API-compatible server for tests: KV v2, token/AppRole/Kubernetes auth, ACL policies,
namespaces, transit, sys/health.

A real Vault cannot be installed here, so tests talk to this instead. Paths, JSON shapes, status
codes and error texts follow Vault's documented HTTP API (docs/vault.md lists each fact with its
source), so keycourier needs no change when VAULT_ADDR points at a real Vault.
"""
from __future__ import annotations

import base64
import copy
import json
import math
import os
import re
import secrets
import socket
import ssl
import string
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import trustme
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.upstreams.server import ResponseWriter, TestServer, TlsHTTPServer
from tests.upstreams.server import server_tls_context  # noqa: F401 (re-exported: was defined here)

VAULT_VERSION = "1.17.2"  # what sys/health and sys/seal-status report
VAULT_BUILD_DATE = "2024-07-05T15:19:12Z"
SYSTEM_MAX_TTL = 768 * 3600  # Vault's default default_lease_ttl and max_lease_ttl (32 days)
KV_DEFAULT_MAX_VERSIONS = 10  # what KV v2 keeps when max_versions is 0
TRANSIT_PREFIX = "vault:v"
GCM_NONCE_BYTES = 12

# Vault's built-in "default" policy, on every non-root token unless no_default_policy: a token may manage itself.
DEFAULT_POLICY = {
    "auth/token/lookup-self": ["read"],
    "auth/token/renew-self": ["update"],
    "auth/token/revoke-self": ["update"],
}

# HTTP verb -> Vault logical operation (GET with ?list=true becomes "list").
METHOD_OPERATIONS = {
    "GET": "read",
    "HEAD": "header",
    "POST": "write",
    "PUT": "write",  # Vault treats PUT and POST as synonyms
    "DELETE": "delete",
    "LIST": "list",
    "PATCH": "patch",
}

# Mounts every namespace has; KV v2 mounts are added per namespace (the root one has secret/, as in dev mode).
BUILTIN_MOUNTS = {
    "sys": "sys",
    "auth/token": "token",
    "auth/approle": "approle",
    "auth/kubernetes": "kubernetes",
    "transit": "transit",
}


def multierror(*messages: str) -> str:
    """Go's hashicorp/go-multierror text, which Vault puts verbatim into its "errors" list."""
    noun = "error" if len(messages) == 1 else "errors"
    return f"{len(messages)} {noun} occurred:\n" + "".join(f"\t* {m}\n" for m in messages) + "\n"


class ApiError(Exception):
    """Ends a request with Vault's error body {"errors": [...]}, or with `body` where Vault sends another."""

    def __init__(self, status: int, *errors: str, body: dict | None = None):
        super().__init__(status, *errors)
        self.status = status
        self.body = body if body is not None else {"errors": list(errors)}


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str  # URL path as sent, e.g. "/v1/secret/data/app"
    query: str  # raw query string, e.g. "version=2"
    headers: Mapping[str, str] = field(repr=False)  # lower-case names; holds the token, so kept out of repr


@dataclass
class Token:
    id: str
    namespace: str
    policies: list[str]
    display_name: str
    path: str
    meta: dict[str, str] | None
    renewable: bool
    orphan: bool
    creation_ttl: int = 0
    explicit_max_ttl: int = 0
    lease_duration: int = 0  # TTL granted by the last issue or renewal; 0 = never expires
    created: float = field(default_factory=time.time)
    expires: float | None = None
    accessor: str = field(default_factory=lambda: random_id(24))

    def remaining(self) -> int:
        return 0 if self.expires is None else max(0, int(self.expires - time.time()))

    def expired(self) -> bool:
        return self.expires is not None and time.time() >= self.expires

    def extend(self, requested: int) -> list[str] | None:
        """Sets the expiry to now + requested, capped at the max TTL like Vault's CalculateTTL; returns its warning."""
        now = time.time()
        allowed = int(self.created + (self.explicit_max_ttl or SYSTEM_MAX_TTL) - now)
        self.lease_duration = min(requested, allowed)
        self.expires = now + self.lease_duration
        if requested <= allowed:
            return None
        return [
            f'TTL of "{go_duration(requested)}" exceeded the effective max_ttl of '
            f'"{go_duration(allowed)}"; TTL value is capped accordingly'
        ]


@dataclass
class KvVersion:
    data: dict | None
    created: str
    deleted: str = ""  # deletion_time; "" while live
    destroyed: bool = False

    @property
    def readable(self) -> bool:
        return not self.deleted and not self.destroyed


@dataclass
class KvSecret:
    created: str
    updated: str
    versions: dict[int, KvVersion] = field(default_factory=dict)
    current_version: int = 0
    oldest_version: int = 0
    max_versions: int = 0
    cas_required: bool = False
    custom_metadata: dict[str, str] | None = None

    def add_version(self, data: dict) -> int:
        now = iso_now()
        self.current_version += 1
        self.versions[self.current_version] = KvVersion(copy.deepcopy(data), now)
        self.updated = now
        # Same pruning as KV v2's KeyMetadata.AddVersion: keep the newest max_versions versions.
        keep = self.max_versions or KV_DEFAULT_MAX_VERSIONS
        if self.current_version - self.oldest_version >= keep:
            first_kept = self.current_version - keep + 1
            for number in range(self.oldest_version, first_kept):
                self.versions.pop(number, None)
            self.oldest_version = first_kept
        return self.current_version

    def version_metadata(self, number: int) -> dict:
        version = self.versions[number]
        return {
            "created_time": version.created,
            "custom_metadata": self.custom_metadata,
            "deletion_time": version.deleted,
            "destroyed": version.destroyed,
            "version": number,
        }

    def metadata(self) -> dict:
        return {
            "cas_required": self.cas_required,
            "created_time": self.created,
            "current_version": self.current_version,
            "custom_metadata": self.custom_metadata,
            "delete_version_after": "0s",
            "max_versions": self.max_versions,
            "oldest_version": self.oldest_version,
            "updated_time": self.updated,
            "versions": {
                str(n): {"created_time": v.created, "deletion_time": v.deleted, "destroyed": v.destroyed}
                for n, v in sorted(self.versions.items())
            },
        }


@dataclass
class AppRole:
    name: str
    role_id: str
    policies: tuple[str, ...]
    token_ttl: int
    secret_id_ttl: int
    secret_ids: dict[str, float | None] = field(default_factory=dict)  # secret_id -> expiry (None: never)

    def new_secret_id(self, ttl: int) -> str:
        secret_id = str(uuid.uuid4())
        self.secret_ids[secret_id] = time.time() + ttl if ttl else None
        return secret_id

    def accepts(self, secret_id: str) -> bool:
        if secret_id not in self.secret_ids:
            return False
        expiry = self.secret_ids[secret_id]
        return expiry is None or time.time() < expiry


@dataclass
class KubernetesRole:
    name: str
    jwt: str  # the one service-account JWT this role accepts (real Vault asks the TokenReview API)
    policies: tuple[str, ...]
    token_ttl: int


@dataclass
class TransitKey:
    versions: list[tuple[bytes, int]] = field(default_factory=list)  # (AES-256 key, creation time); v1 first

    def rotate(self) -> None:
        self.versions.append((AESGCM.generate_key(bit_length=256), int(time.time())))


@dataclass
class Namespace:
    kv: dict[str, dict[str, KvSecret]] = field(default_factory=dict)  # mount -> path -> secret
    approles: dict[str, AppRole] = field(default_factory=dict)
    kubernetes_roles: dict[str, KubernetesRole] = field(default_factory=dict)
    transit_keys: dict[str, TransitKey] = field(default_factory=dict)

    def ensure_transit_key(self, name: str) -> TransitKey:
        if name not in self.transit_keys:
            key = self.transit_keys[name] = TransitKey()
            key.rotate()
        return self.transit_keys[name]


@dataclass
class Request:
    namespace: str  # "" is the root namespace
    ns: Namespace
    mount: str
    path: str  # namespace-relative, e.g. "secret/data/app"
    params: dict[str, str]  # the route's named groups
    query: dict[str, list[str]]
    body: dict
    token: Token | None = None

    @property
    def kv(self) -> dict[str, KvSecret]:
        return self.ns.kv[self.mount]


class Route(NamedTuple):
    pattern: re.Pattern
    operations: Mapping[str, Callable]  # operation -> handler(server, request) -> (status, body)
    public: bool = False  # login and status endpoints need no token
    sealed_ok: bool = False  # answered while sealed
    exists: Callable[[Request], bool] | None = None  # a write needs "create" rather than "update" when False


def kv_exists(request: Request) -> bool:
    return request.params["path"] in request.kv


def transit_key_exists(request: Request) -> bool:
    return request.params["name"] in request.ns.transit_keys


def endpoint(pattern: str, operations: Mapping[str, Callable], **flags) -> Route:
    return Route(re.compile(pattern), operations, **flags)


class VaultServer(TestServer):
    """In-memory Vault on 127.0.0.1 (HTTPS with a cert from `ca` unless tls=False), started by start() or `with`."""

    thread_name = "vault-test-server"
    missing_ca_message = "tls=True needs a trustme.CA to issue the server certificate"

    def __init__(self, ca: trustme.CA | None, *, root_token: str = "root-token", tls: bool = True):
        super().__init__(ca, tls=tls)
        self.root_token = root_token
        self.requests: list[ReceivedRequest] = []
        self._lock = threading.Lock()
        self._sealed = False
        self.latency = 0.0  # seconds every answer takes, like a Vault far away or under load
        self._namespaces = {"": Namespace(kv={"secret": {}})}
        self._policies: dict[str, dict[str, list[str]]] = {"default": DEFAULT_POLICY}
        root = Token(
            id=root_token, namespace="", policies=["root"], display_name="root", path="auth/token/root",
            meta=None, renewable=False, orphan=True,
        )
        self._tokens = {root_token: root}
        self._cluster = {"cluster_name": f"vault-cluster-{secrets.token_hex(4)}", "cluster_id": str(uuid.uuid4())}

    # --- lifecycle (start, stop and `with` from TestServer) ---------------------------------

    def _make_server(self, ssl_context: ssl.SSLContext | None, port: int) -> _HTTPServer:
        return _HTTPServer(_Handler, ssl_context, owner=self, port=port)

    @property
    def addr(self) -> str:
        return self.base_url

    def set_down(self, down: bool) -> None:
        """Down: nothing listens and open connections are cut, like a crashed Vault. Up: same port, same data."""
        if down:
            self.stop()
        elif self._server is None:
            self.start()

    def seal(self, sealed: bool) -> None:
        """Sealed: sys/health and sys/seal-status say so (503 for health); every other request gets 503."""
        with self._lock:
            self._sealed = sealed

    # --- seeding and inspection ------------------------------------------------------------

    def kv_put(self, path: str, data: dict, *, mount: str = "secret", namespace: str = "") -> int:
        """Writes a new version directly (creating the mount and namespace if needed); returns its number."""
        with self._lock:
            store = self._namespace(namespace).kv.setdefault(mount, {})
            return kv_secret(store, path).add_version(data)

    def kv_read(self, path: str, *, mount: str = "secret", namespace: str = "") -> dict:
        """The newest version's data."""
        with self._lock:
            secret = kv_secret(self._namespace(namespace).kv.setdefault(mount, {}), path)
            return copy.deepcopy(secret.versions[secret.current_version].data)

    def kv_live_versions(self, path: str, *, mount: str = "secret", namespace: str = "") -> list[int]:
        """The versions of a secret that are neither deleted nor destroyed."""
        with self._lock:
            secret = kv_secret(self._namespace(namespace).kv.setdefault(mount, {}), path)
            return [number for number, version in secret.versions.items() if version.readable]

    def add_approle(
        self,
        role_name: str,
        *,
        token_policies: Iterable[str] = (),
        token_ttl: int = 3600,
        secret_id_ttl: int = 0,
        namespace: str = "",
    ) -> tuple[str, str]:
        """Creates (or replaces) an AppRole; returns (role_id, secret_id)."""
        with self._lock:
            role = AppRole(role_name, str(uuid.uuid4()), tuple(token_policies), token_ttl, secret_id_ttl)
            self._namespace(namespace).approles[role_name] = role
            return role.role_id, role.new_secret_id(secret_id_ttl)

    def add_kubernetes_role(
        self,
        role: str,
        *,
        service_account_jwt: str,
        token_policies: Iterable[str] = (),
        token_ttl: int = 3600,
        namespace: str = "",
    ) -> None:
        with self._lock:
            self._namespace(namespace).kubernetes_roles[role] = KubernetesRole(
                role, service_account_jwt, tuple(token_policies), token_ttl
            )

    def set_policy(self, name: str, rules: Mapping[str, Iterable[str]]) -> None:
        """An ACL policy as {path pattern: capabilities}, e.g. {"secret/data/app/*": ["read"]}."""
        if name == "root":
            raise ValueError("the root policy cannot be changed")
        with self._lock:
            self._policies[name] = {path: list(caps) for path, caps in rules.items()}

    def count(self, method: str, path_prefix: str) -> int:
        return sum(1 for r in list(self.requests) if r.method == method.upper() and r.path.startswith(path_prefix))

    def _namespace(self, name: str) -> Namespace:
        """Namespaces appear on first use, as if an operator had created them through sys/namespaces."""
        return self._namespaces.setdefault(name.strip("/"), Namespace())

    # --- request handling ------------------------------------------------------------------

    def _respond(self, method: str, target: str, headers: dict[str, str], raw_body: bytes) -> tuple[int, dict | None]:
        url = urlsplit(target)
        self.requests.append(ReceivedRequest(method, url.path, url.query, headers))
        time.sleep(self.latency)  # outside the lock: a slow Vault still answers concurrent requests
        try:
            with self._lock:
                return self._dispatch(method, url.path, parse_qs(url.query), headers, raw_body)
        except ApiError as error:
            return error.status, error.body

    def _dispatch(self, method, url_path, query, headers, raw_body) -> tuple[int, dict | None]:
        if not url_path.startswith("/v1/"):
            raise ApiError(404)
        operation = operation_for(method, query)
        namespace, path = self._split_namespace(headers.get("x-vault-namespace", ""), unquote(url_path[len("/v1/"):]))
        if operation == "list" and not path.endswith("/"):
            path += "/"  # Vault lists folders: "LIST secret/metadata" is "secret/metadata/"
        ns = self._namespaces[namespace]
        mount, route, params = self._resolve(ns, path)
        if self._sealed and not (route and route.sealed_ok):
            raise ApiError(503, "Vault is sealed")
        request = Request(namespace, ns, mount, path, params, query, json_body(method, raw_body))
        # As in Vault, the token and its ACL are checked before the path is routed.
        if not (route and route.public):
            request.token = self._authenticate(headers, namespace)
            self._authorize(request.token, path, capability_for(operation, route, request))
        if not mount:
            raise ApiError(404, f'no handler for route "{path}". route entry not found.')
        if route is None:
            raise ApiError(404, multierror("unsupported path"))
        handler = route.operations.get(operation)
        if handler is None:
            raise ApiError(405, multierror("unsupported operation"))
        return handler(self, request)

    def _resolve(self, ns: Namespace, path: str) -> tuple[str, Route | None, dict[str, str]]:
        """(mount, route, params) by longest mount prefix, as Vault's router does; mount "" when none matches."""
        mounts = {**BUILTIN_MOUNTS, **{mount: "kv" for mount in ns.kv}}
        for mount in sorted(mounts, key=len, reverse=True):
            if path == mount or path.startswith(mount + "/"):
                rest = path[len(mount) + 1:]
                for candidate in self.ROUTES[mounts[mount]]:
                    match = candidate.pattern.fullmatch(rest)
                    if match:
                        return mount, candidate, match.groupdict()
                return mount, None, {}
        return "", None, {}

    def _split_namespace(self, header: str, path: str) -> tuple[str, str]:
        """Vault Enterprise joins X-Vault-Namespace and the URL path, then takes the longest namespace prefix."""
        full = f"{header.strip('/')}/{path}" if header.strip("/") else path
        for name in sorted(self._namespaces, key=len, reverse=True):
            if name and full.startswith(name + "/"):
                return name, full[len(name) + 1:]
        return "", full

    def _authenticate(self, headers: dict[str, str], namespace: str) -> Token:
        presented = headers.get("x-vault-token") or bearer_token(headers.get("authorization", ""))
        if not presented:
            raise ApiError(403, "permission denied")
        token = self._tokens.get(presented)
        if token is None or token.expired():
            self._tokens.pop(presented, None)
            raise ApiError(403, multierror("permission denied", "invalid token"))
        # A token works in its own namespace and the ones below it (root-namespace tokens everywhere).
        if token.namespace and namespace != token.namespace and not namespace.startswith(token.namespace + "/"):
            raise ApiError(403, multierror("permission denied"))
        return token

    def _authorize(self, token: Token, path: str, capability: str) -> None:
        if "root" in token.policies:
            return
        granted = self._capabilities(token.policies, path)
        if "deny" in granted or capability not in granted:
            raise ApiError(403, multierror("permission denied"))

    def _capabilities(self, policy_names: Iterable[str], path: str) -> set[str]:
        """Vault's rule: union the capabilities of equal patterns, then apply only the highest-priority match."""
        merged: dict[str, set[str]] = {}
        for name in policy_names:
            for pattern, caps in self._policies.get(name, {}).items():
                merged.setdefault(pattern, set()).update(caps)
        matching = [pattern for pattern in merged if policy_pattern_matches(pattern, path)]
        return merged[max(matching, key=policy_priority)] if matching else set()

    def _issue_token(
        self,
        namespace: str,
        policies: Iterable[str],
        ttl: int,
        *,
        display_name: str,
        path: str,
        meta: dict[str, str] | None,
        renewable: bool = True,
        orphan: bool = True,
        explicit_max_ttl: int = 0,
        default_policy: bool = True,
    ) -> tuple[Token, list[str] | None]:
        """A new service token; ttl 0 (root-policy tokens only) never expires."""
        policies = set(policies)
        names = ["root"] if "root" in policies else sorted(policies | ({"default"} if default_policy else set()))
        token = Token(
            id="hvs." + random_id(24), namespace=namespace, policies=names, display_name=display_name, path=path,
            meta=meta, renewable=renewable, orphan=orphan, creation_ttl=ttl, explicit_max_ttl=explicit_max_ttl,
        )
        warnings = token.extend(ttl) if ttl else None
        self._tokens[token.id] = token
        return token, warnings

    # --- sys ---------------------------------------------------------------------------------

    def _sys_health(self, request: Request):
        if self._sealed:
            status = query_int(request.query, "sealedcode", 503)
        else:
            status = query_int(request.query, "activecode", 200)
        return status, {
            "initialized": True,
            "sealed": self._sealed,
            "standby": False,
            "performance_standby": False,
            "replication_performance_mode": "disabled",
            "replication_dr_mode": "disabled",
            "server_time_utc": int(time.time()),
            "version": VAULT_VERSION,
            **({} if self._sealed else self._cluster),  # a sealed Vault does not know its cluster
        }

    def _sys_seal_status(self, request: Request):
        return 200, {
            "type": "shamir",
            "initialized": True,
            "sealed": self._sealed,
            "t": 1,
            "n": 1,
            "progress": 0,
            "nonce": "",
            "version": VAULT_VERSION,
            "build_date": VAULT_BUILD_DATE,
            "migration": False,
            "recovery_seal": False,
            "storage_type": "inmem",
            **({} if self._sealed else self._cluster),
        }

    # --- auth/token ----------------------------------------------------------------------------

    def _token_lookup_self(self, request: Request):
        return ok(data=token_data(request.token))

    def _token_renew_self(self, request: Request):
        token = request.token
        if token.expires is None:
            raise ApiError(400, "invalid lease ID")
        if not token.renewable:
            raise ApiError(400, "lease is not renewable")
        warnings = token.extend(duration(request.body.get("increment")) or token.creation_ttl)
        return ok(auth=auth_block(token), warnings=warnings)

    def _token_revoke_self(self, request: Request):
        del self._tokens[request.token.id]
        return 204, None

    def _token_create(self, request: Request):
        caller, body = request.token, request.body
        policies = body.get("policies") or caller.policies
        if "root" not in caller.policies and not set(policies) <= set(caller.policies):
            raise ApiError(400, "child policies must be subset of parent")
        ttl = duration(body.get("ttl")) or (0 if "root" in policies else SYSTEM_MAX_TTL)
        token, warnings = self._issue_token(
            request.namespace,
            policies,
            ttl,
            display_name="token" + (f"-{body['display_name']}" if body.get("display_name") else ""),
            path="auth/token/create",
            meta=body.get("meta"),
            renewable=body.get("renewable", True),
            orphan=False,
            explicit_max_ttl=duration(body.get("explicit_max_ttl")),
            default_policy=not body.get("no_default_policy", False),
        )
        return ok(auth=auth_block(token), warnings=warnings)

    # --- auth/approle and auth/kubernetes ------------------------------------------------------

    def _approle_login(self, request: Request):
        role_id = str(request.body.get("role_id") or "").strip()
        if not role_id:
            raise ApiError(400, "missing role_id")
        role = next((r for r in request.ns.approles.values() if r.role_id == role_id), None)
        if role is None:
            raise ApiError(400, "invalid role or secret ID")
        secret_id = str(request.body.get("secret_id") or "").strip()
        if not secret_id:
            raise ApiError(400, "missing secret_id")
        if not role.accepts(secret_id):
            raise ApiError(400, "invalid role or secret ID")
        token, warnings = self._issue_token(
            request.namespace, role.policies, role.token_ttl or SYSTEM_MAX_TTL,
            display_name="approle", path="auth/approle/login", meta={"role_name": role.name},
        )
        return ok(auth=auth_block(token), warnings=warnings)

    def _approle_role_id(self, request: Request):
        role = request.ns.approles.get(request.params["role"])
        if role is None:
            raise ApiError(404)
        return ok(data={"role_id": role.role_id})

    def _approle_secret_id(self, request: Request):
        name = request.params["role"]
        role = request.ns.approles.get(name)
        if role is None:
            raise ApiError(400, f'role "{name}" does not exist')
        ttl = duration(request.body.get("ttl")) or role.secret_id_ttl
        return ok(data={
            "secret_id": role.new_secret_id(ttl),
            "secret_id_accessor": str(uuid.uuid4()),
            "secret_id_ttl": ttl,
            "secret_id_num_uses": 0,
        })

    def _kubernetes_login(self, request: Request):
        name, jwt = request.body.get("role"), request.body.get("jwt")
        if not name:
            raise ApiError(400, "missing role")
        if not jwt:
            raise ApiError(400, "missing jwt")
        role = request.ns.kubernetes_roles.get(name)
        if role is None:
            raise ApiError(400, f'invalid role name "{name}"')
        if not secrets.compare_digest(str(jwt), role.jwt):
            raise ApiError(403, "permission denied")  # what Vault answers when TokenReview rejects the JWT
        token, warnings = self._issue_token(
            request.namespace, role.policies, role.token_ttl or SYSTEM_MAX_TTL,
            display_name=f"kubernetes-{name}", path="auth/kubernetes/login", meta={"role": name},
        )
        return ok(auth=auth_block(token), warnings=warnings)

    # --- KV v2 -----------------------------------------------------------------------------------

    def _kv_read(self, request: Request):
        secret = request.kv.get(request.params["path"])
        number = query_int(request.query, "version", 0) or (secret.current_version if secret else 0)
        version = secret.versions.get(number) if secret else None
        if version is None:
            raise ApiError(404)
        envelope = vault_envelope(data={"data": None, "metadata": secret.version_metadata(number)})
        if not version.readable:
            raise ApiError(404, body=envelope)  # Vault sends the version's metadata, not an "errors" list
        envelope["data"]["data"] = copy.deepcopy(version.data)
        return 200, envelope

    def _kv_write(self, request: Request):
        data = request.body.get("data")
        if not isinstance(data, dict):
            raise ApiError(400, "no data provided")
        path = request.params["path"]
        check_and_set(request.body.get("options") or {}, request.kv.get(path))
        secret = kv_secret(request.kv, path)
        return ok(data=secret.version_metadata(secret.add_version(data)))

    def _kv_delete_latest(self, request: Request):
        secret = request.kv.get(request.params["path"])
        latest = secret.versions.get(secret.current_version) if secret else None
        if latest and latest.readable:
            latest.deleted = iso_now()
        return 204, None

    def _kv_versions(self, request: Request):
        """POST delete/, undelete/ or destroy/ with {"versions": [...]}."""
        try:
            numbers = [int(number) for number in request.body.get("versions") or ()]
        except (TypeError, ValueError):
            raise ApiError(400, "versions must be a list of integers") from None
        if not numbers:
            raise ApiError(400, "no version number provided")
        secret = request.kv.get(request.params["path"])
        action = request.params["action"]
        for number in numbers:
            version = secret.versions.get(number) if secret else None
            if version is None or version.destroyed:
                continue
            if action == "delete" and not version.deleted:
                version.deleted = iso_now()
            elif action == "undelete":
                version.deleted = ""
            elif action == "destroy":
                version.destroyed, version.data = True, None
        return 204, None

    def _kv_metadata_read(self, request: Request):
        secret = request.kv.get(request.params["path"])
        if secret is None:
            raise ApiError(404)
        return ok(data=secret.metadata())

    def _kv_metadata_write(self, request: Request):
        body = request.body
        if duration(body.get("delete_version_after")):
            raise ApiError(400, "delete_version_after is not supported by this test server")
        secret = kv_secret(request.kv, request.params["path"])
        if "max_versions" in body:
            secret.max_versions = int(body["max_versions"])
        if "cas_required" in body:
            secret.cas_required = bool(body["cas_required"])
        if "custom_metadata" in body:
            secret.custom_metadata = dict(body["custom_metadata"] or {}) or None
        secret.updated = iso_now()
        return 204, None

    def _kv_metadata_delete(self, request: Request):
        request.kv.pop(request.params["path"], None)
        return 204, None

    def _kv_list(self, request: Request):
        prefix = request.params["path"]
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        keys = sorted({child_key(path[len(prefix):]) for path in request.kv if path.startswith(prefix)})
        if not keys:
            raise ApiError(404)  # Vault answers an empty list with 404 {"errors": []}
        return ok(data={"keys": keys})

    # --- transit ---------------------------------------------------------------------------------

    def _transit_key_write(self, request: Request):
        key_type = request.body.get("type", "aes256-gcm96")
        if key_type != "aes256-gcm96":
            raise ApiError(400, f'key type "{key_type}" is not supported by this test server')
        request.ns.ensure_transit_key(request.params["name"])
        return 204, None

    def _transit_key_read(self, request: Request):
        name = request.params["name"]
        key = request.ns.transit_keys.get(name)
        if key is None:
            raise ApiError(404)
        return ok(data={
            "name": name,
            "type": "aes256-gcm96",
            "keys": {str(n): created for n, (_, created) in enumerate(key.versions, start=1)},
            "latest_version": len(key.versions),
            "min_decryption_version": 1,
            "min_encryption_version": 0,
            "deletion_allowed": False,
            "derived": False,
            "exportable": False,
            "allow_plaintext_backup": False,
            "supports_encryption": True,
            "supports_decryption": True,
            "supports_derivation": True,
            "supports_signing": False,
            "imported": False,
        })

    def _transit_rotate(self, request: Request):
        self._transit_key(request).rotate()
        return 204, None

    def _transit_encrypt(self, request: Request):
        if "plaintext" not in request.body:
            raise ApiError(400, "missing plaintext to encrypt")
        plaintext = b64decode(request.body["plaintext"], "failed to base64-decode plaintext")
        # Encrypting with a missing key creates it (Vault's upsert; the ACL asked for "create").
        ciphertext, version = transit_seal(request.ns.ensure_transit_key(request.params["name"]), plaintext)
        return ok(data={"ciphertext": ciphertext, "key_version": version})

    def _transit_decrypt(self, request: Request):
        if "ciphertext" not in request.body:
            raise ApiError(400, "missing ciphertext to decrypt")
        plaintext = transit_open(self._transit_key(request), str(request.body["ciphertext"]))
        return ok(data={"plaintext": base64.b64encode(plaintext).decode()})

    def _transit_datakey(self, request: Request):
        bits = int(request.body.get("bits", 256))
        if bits not in (128, 256, 512):
            raise ApiError(400, "invalid bit length")
        material = os.urandom(bits // 8)
        ciphertext, version = transit_seal(self._transit_key(request), material)
        data = {"ciphertext": ciphertext, "key_version": version}
        if request.params["kind"] == "plaintext":
            data["plaintext"] = base64.b64encode(material).decode()
        return ok(data=data)

    def _transit_key(self, request: Request) -> TransitKey:
        key = request.ns.transit_keys.get(request.params["name"])
        if key is None:
            raise ApiError(400, "encryption key not found")
        return key

    # Patterns are relative to the mount; the engine name is the mount's type (see BUILTIN_MOUNTS).
    ROUTES: dict[str, list[Route]] = {
        "sys": [
            endpoint(r"health", {"read": _sys_health, "header": _sys_health}, public=True, sealed_ok=True),
            endpoint(r"seal-status", {"read": _sys_seal_status}, public=True, sealed_ok=True),
        ],
        "token": [
            endpoint(r"lookup-self", {"read": _token_lookup_self}),
            endpoint(r"renew-self", {"write": _token_renew_self}),
            endpoint(r"revoke-self", {"write": _token_revoke_self}),
            endpoint(r"create", {"write": _token_create}),
        ],
        "approle": [
            endpoint(r"login", {"write": _approle_login}, public=True),
            endpoint(r"role/(?P<role>[^/]+)/role-id", {"read": _approle_role_id}),
            endpoint(r"role/(?P<role>[^/]+)/secret-id", {"write": _approle_secret_id}),
        ],
        "kubernetes": [
            endpoint(r"login", {"write": _kubernetes_login}, public=True),
        ],
        "transit": [
            endpoint(r"keys/(?P<name>[^/]+)", {"read": _transit_key_read, "write": _transit_key_write}),
            endpoint(r"keys/(?P<name>[^/]+)/rotate", {"write": _transit_rotate}),
            endpoint(r"encrypt/(?P<name>[^/]+)", {"write": _transit_encrypt}, exists=transit_key_exists),
            endpoint(r"decrypt/(?P<name>[^/]+)", {"write": _transit_decrypt}),
            endpoint(r"datakey/(?P<kind>plaintext|wrapped)/(?P<name>[^/]+)", {"write": _transit_datakey}),
        ],
        "kv": [
            endpoint(
                r"data/(?P<path>.*[^/])",
                {"read": _kv_read, "write": _kv_write, "delete": _kv_delete_latest},
                exists=kv_exists,
            ),
            endpoint(
                r"metadata/(?P<path>.*)",
                {"read": _kv_metadata_read, "list": _kv_list, "write": _kv_metadata_write,
                 "delete": _kv_metadata_delete},
                exists=kv_exists,
            ),
            endpoint(r"(?P<action>delete|undelete|destroy)/(?P<path>.*[^/])", {"write": _kv_versions}),
        ],
    }


def operation_for(method: str, query: dict[str, list[str]]) -> str:
    operation = METHOD_OPERATIONS.get(method)
    if operation is None:
        raise ApiError(405)
    if operation == "read" and query.get("list", [""])[0].lower() in ("1", "t", "true"):
        return "list"
    return operation


def capability_for(operation: str, route: Route | None, request: Request) -> str:
    if operation == "write":
        creating = route is not None and route.exists is not None and not route.exists(request)
        return "create" if creating else "update"
    return {"header": "read"}.get(operation, operation)


def policy_pattern_matches(pattern: str, path: str) -> bool:
    """`+` is one path segment; a trailing `*` is a prefix glob."""
    glob = pattern.endswith("*")
    body = pattern[:-1] if glob else pattern
    regex = "/".join("[^/]+" if segment == "+" else re.escape(segment) for segment in body.split("/"))
    return re.fullmatch(regex + (".*" if glob else ""), path) is not None


def policy_priority(pattern: str) -> tuple:
    """Sort key for Vault's documented priority rules; the largest key wins."""
    first_wildcard = next((i for i, c in enumerate(pattern) if c in "+*"), math.inf)
    plus_segments = pattern.split("/").count("+")
    return first_wildcard, not pattern.endswith("*"), -plus_segments, len(pattern), pattern


def check_and_set(options: dict, secret: KvSecret | None) -> None:
    current = secret.current_version if secret else 0
    if "cas" in options:
        try:
            cas = int(options["cas"])
        except (TypeError, ValueError):
            raise ApiError(400, "error parsing check-and-set parameter") from None
        if cas != current:
            raise ApiError(400, "check-and-set parameter did not match the current version")
    elif secret and secret.cas_required:
        raise ApiError(400, "check-and-set parameter required for this call")


def kv_secret(store: dict[str, KvSecret], path: str) -> KvSecret:
    if path not in store:
        now = iso_now()
        store[path] = KvSecret(created=now, updated=now)
    return store[path]


def child_key(rest: str) -> str:
    """The list entry for a path below the listed prefix: "a" for a secret, "a/" for a folder."""
    head, slash, _ = rest.partition("/")
    return head + slash


def transit_seal(key: TransitKey, plaintext: bytes) -> tuple[str, int]:
    """Vault's aes256-gcm96 ciphertext: "vault:v<version>:" + base64(nonce || ciphertext || tag)."""
    version = len(key.versions)
    nonce = os.urandom(GCM_NONCE_BYTES)
    sealed = nonce + AESGCM(key.versions[-1][0]).encrypt(nonce, plaintext, None)
    return f"{TRANSIT_PREFIX}{version}:{base64.b64encode(sealed).decode()}", version


def transit_open(key: TransitKey, ciphertext: str) -> bytes:
    if not ciphertext.startswith(TRANSIT_PREFIX):
        raise ApiError(400, "invalid ciphertext: no prefix")
    version_text, separator, payload = ciphertext[len(TRANSIT_PREFIX):].partition(":")
    if not separator:
        raise ApiError(400, "invalid ciphertext: wrong number of fields")
    try:
        version = int(version_text) or 1  # v0 is read as v1, for ciphertexts from before key versions
    except ValueError:
        raise ApiError(400, "invalid ciphertext: version number could not be decoded") from None
    if version > len(key.versions):
        raise ApiError(400, "invalid ciphertext: version is too new")
    sealed = b64decode(payload, "invalid ciphertext: could not decode base64")
    if len(sealed) < GCM_NONCE_BYTES:
        raise ApiError(400, "invalid ciphertext length")
    try:
        return AESGCM(key.versions[version - 1][0]).decrypt(sealed[:GCM_NONCE_BYTES], sealed[GCM_NONCE_BYTES:], None)
    except InvalidTag:
        raise ApiError(400, "cipher: message authentication failed") from None


def b64decode(value, error: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except ValueError:
        raise ApiError(400, error) from None


def json_body(method: str, raw: bytes) -> dict:
    if method not in ("POST", "PUT") or not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"failed to parse JSON input: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "failed to parse JSON input: not a JSON object")
    return body


def bearer_token(authorization: str) -> str:
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme == "Bearer" else ""


DURATION_PART = re.compile(r"(\d+)([smhd])")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(value) -> int:
    """Vault's duration parameters in seconds: a number, a numeric string, or units like "1h30m" or "7d"."""
    if value is None or value == "":
        return 0
    text = str(value)
    if isinstance(value, (int, float)) or text.isdigit():
        return int(value)
    parts = DURATION_PART.findall(text)
    if "".join(number + unit for number, unit in parts) != text:
        raise ApiError(400, f'cannot parse duration "{text}"')
    return sum(int(number) * DURATION_UNITS[unit] for number, unit in parts)


def go_duration(seconds: int) -> str:
    """Go's time.Duration.String() for whole seconds, as Vault prints TTLs in warnings: 3600 -> "1h0m0s"."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def query_int(query: dict[str, list[str]], name: str, default: int) -> int:
    values = query.get(name)
    if not values:
        return default
    try:
        return int(values[0])
    except ValueError:
        raise ApiError(400, f'cannot parse "{name}" as an integer') from None


def vault_envelope(*, data=None, auth=None, warnings=None) -> dict:
    """The JSON every Vault API response body shares."""
    return {
        "request_id": str(uuid.uuid4()),
        "lease_id": "",
        "renewable": False,
        "lease_duration": 0,
        "data": data,
        "wrap_info": None,
        "warnings": warnings,
        "auth": auth,
    }


def ok(**envelope) -> tuple[int, dict]:
    return 200, vault_envelope(**envelope)


def auth_block(token: Token) -> dict:
    return {
        "client_token": token.id,
        "accessor": token.accessor,
        "policies": token.policies,
        "token_policies": token.policies,
        "metadata": token.meta,
        "lease_duration": token.lease_duration,
        "renewable": token.renewable,
        "entity_id": "",
        "token_type": "service",
        "orphan": token.orphan,
        "mfa_requirement": None,
        "num_uses": 0,
    }


def token_data(token: Token) -> dict:
    return {
        "accessor": token.accessor,
        "creation_time": int(token.created),
        "creation_ttl": token.creation_ttl,
        "display_name": token.display_name,
        "entity_id": "",
        "expire_time": iso_time(token.expires) if token.expires is not None else None,
        "explicit_max_ttl": token.explicit_max_ttl,
        "id": token.id,
        "issue_time": iso_time(token.created),
        "meta": token.meta,
        "num_uses": 0,
        "orphan": token.orphan,
        "path": token.path,
        "policies": token.policies,
        "renewable": token.renewable,
        "ttl": token.remaining(),
        "type": "service",
    }


def iso_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def iso_now() -> str:
    return iso_time(time.time())


ALPHANUMERIC = string.ascii_letters + string.digits


def random_id(length: int) -> str:
    return "".join(secrets.choice(ALPHANUMERIC) for _ in range(length))


class _HTTPServer(TlsHTTPServer):
    """Tracks its connections, so that going down cuts them like a crashed Vault."""

    def __init__(self, *args, **kwargs):
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._cut = False
        super().__init__(*args, **kwargs)

    def finish_request(self, request, client_address):
        # The TLS handshake runs in the connection's own thread (ResponseWriter.handle).
        with self._connections_lock:
            if self._cut:  # accepted just before going down: it must not be served
                request.close()
                return
            self._connections.add(request)
        try:
            super().finish_request(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.discard(request)
            request.close()

    def server_close(self):
        super().server_close()
        self.cut_connections()

    def cut_connections(self) -> None:
        with self._connections_lock:
            self._cut = True
            connections = list(self._connections)
        for connection in connections:
            try:
                # socket.socket's shutdown, not SSLSocket's, which would pull the TLS state from under the reader.
                socket.socket.shutdown(connection, socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # cut connections are expected, not worth a traceback
            super().handle_error(request, client_address)


class _Handler(ResponseWriter, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Vault clients pool their connections
    disable_nagle_algorithm = True  # headers and body go out in separate writes; don't let them wait for an ACK

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {name.lower(): value for name, value in self.headers.items()}
        status, payload = self.server.owner._respond(self.command, self.path, headers, body)
        content = b"" if payload is None else json.dumps(payload).encode()
        self.write_response(status, [
            ("Cache-Control", "no-store"),
            ("Content-Type", "application/json"),  # exactly this: hvac parses errors only then
        ], content)

    def __getattr__(self, name: str):
        # http.server looks up do_<VERB>; every verb is answered, as Vault answers unknown ones with 405.
        if name.startswith("do_"):
            return self._answer
        raise AttributeError(name)
