"""Vault access through hvac: login (token, AppRole) and KV v2 reads. Configured like the Vault CLI."""
from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import hvac
import hvac.exceptions
import requests

from keycourier import metrics
from keycourier.policy import VaultConfig, VaultSecretRef


class VaultError(Exception):
    """A reason safe to show: names paths and addresses, never tokens or secret values."""

    def __init__(self, reason: str, outcome: str = "error"):
        super().__init__(reason)
        self.outcome = outcome  # metric label: ok, not_found, denied, sealed, tls, unreachable, error


ANSWERED = frozenset({"ok", "not_found", "denied"})  # outcomes (metrics.VAULT_OUTCOMES) in which Vault answered


class Contact:
    """When Vault last answered and last failed to (monotonic clock): readiness is judged from these, so a
    probe never makes a Vault request of its own."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.answered: float | None = None
        self.failed: float | None = None
        self.failure = ""

    def record(self, outcome: str, reason: str = "") -> None:
        if outcome in ANSWERED:
            self.answered = self.clock()
        else:
            self.failed, self.failure = self.clock(), reason
        metrics.VAULT_UP.set(outcome in ANSWERED)

    def quiet_for(self) -> float:
        """Seconds since Vault was last asked anything (infinite if never)."""
        last = max((t for t in (self.answered, self.failed) if t is not None), default=None)
        return float("inf") if last is None else self.clock() - last

    def problem(self, grace: float) -> str | None:
        """None while Vault answered last, or answered within `grace` seconds (what it gave is still cached)."""
        if self.failed is None or (self.answered is not None and self.answered >= self.failed):
            return None if self.answered is not None else "Vault not contacted yet"
        if self.answered is not None and self.clock() - self.answered <= grace:
            return None
        return self.failure


RENEW_AFTER = 2 / 3  # of the token's lease, as Vault Agent does, so a busy proxy never holds an expired token


@dataclass
class _Lease:
    obtained: float
    seconds: int  # 0: the token never expires
    renewable: bool

    def due(self, now: float) -> bool:
        return self.seconds > 0 and now >= self.obtained + self.seconds * RENEW_AFTER


class Vault:
    """One authenticated hvac client. Settings come from policies.yaml, else from VAULT_ADDR,
    VAULT_TOKEN, VAULT_CACERT and VAULT_NAMESPACE, as the Vault CLI and hvac users expect.
    Tokens are renewed once two thirds of their lease have passed; when renewal fails, it logs in again."""

    def __init__(self, config: VaultConfig | None, environ: Mapping[str, str] = os.environ,
                 clock: Callable[[], float] = time.monotonic):
        config = config or VaultConfig()
        self.addr = config.addr or environ.get("VAULT_ADDR")
        if not self.addr:
            raise VaultError("no Vault address: set vault.addr in the policy or VAULT_ADDR")
        if not self.addr.startswith("https://"):
            raise VaultError(f"Vault address {self.addr} is not https: keys are only fetched over verified TLS")
        ca_cert = config.ca_cert or environ.get("VAULT_CACERT")
        self.auth = config.auth
        self.environ = environ
        self._login_lock = threading.Lock()
        self.client = hvac.Client(
            url=self.addr,
            token="",  # not hvac's own VAULT_TOKEN lookup: _login decides
            verify=str(ca_cert) if ca_cert else True,
            namespace=config.namespace or environ.get("VAULT_NAMESPACE"),
            timeout=10,
        )
        self._token_generation = 0
        self._lease = _Lease(0.0, 0, False)
        self.clock = clock
        self.contact = Contact(clock)

    def read_kv2(self, ref: VaultSecretRef) -> tuple[dict, int, datetime | None]:
        """GET /v1/<mount>/data/<path>[?version=N]: the secret's fields, its version and when it was written."""
        where = f"{ref.api_path}" + (f" version {ref.version}" if ref.version else "")
        response = self._with_login(
            lambda: self.client.secrets.kv.v2.read_secret_version(
                path=ref.path, mount_point=ref.mount, version=ref.version, raise_on_deleted_version=True
            ),
            where,
        )
        data = response["data"]
        return data["data"] or {}, data["metadata"]["version"], _rfc3339(data["metadata"].get("created_time"))

    def problem(self) -> str | None:
        """GET /v1/sys/health: None when Vault is up and unsealed, else the reason."""
        try:
            self._call(lambda: self.client.sys.read_health_status(method="GET"), "sys/health")
        except VaultError as exc:
            return str(exc)
        return None

    def _with_login(self, call, where: str):
        generation = self._ensure_login()
        try:
            return self._call(call, where)
        except VaultError as exc:
            if exc.outcome != "denied":
                raise
        # The token may have expired or been revoked since login: log in again once, then give up.
        self._ensure_login(stale_generation=generation)
        return self._call(call, where)

    def _call(self, call, where: str):
        """One Vault request, timed and counted, its failure turned into a VaultError naming `where`."""
        try:
            with metrics.VAULT_SECONDS.time():
                result = call()
        except hvac.exceptions.InvalidPath:
            error = VaultError(f"Vault has no secret at {where}", "not_found")
        except hvac.exceptions.Forbidden:
            error = VaultError(f"Vault denied access to {where} (permission denied)", "denied")
        except hvac.exceptions.VaultDown:
            error = VaultError(f"Vault at {self.addr} is sealed or down", "sealed")
        except hvac.exceptions.VaultError as exc:
            error = VaultError(f"Vault refused {where}: {type(exc).__name__}")
        except requests.exceptions.SSLError:
            error = VaultError(f"Vault at {self.addr} failed TLS verification", "tls")
        except requests.exceptions.RequestException:
            error = VaultError(f"Vault at {self.addr} is unreachable", "unreachable")
        else:
            metrics.child(metrics.VAULT_REQUESTS, "ok").inc()
            self.contact.record("ok")
            return result
        metrics.child(metrics.VAULT_REQUESTS, error.outcome).inc()
        self.contact.record(error.outcome, str(error))
        raise error

    def _ensure_login(self, stale_generation: int | None = None) -> int:
        """Logs in when there is no token yet or the token of `stale_generation` was refused;
        renews a token whose lease is two thirds gone (logging in again if that fails)."""
        with self._login_lock:
            if self.client.token and stale_generation != self._token_generation:
                if not self._lease.due(self.clock()) or self._renew():
                    return self._token_generation
            self.client.token, self._lease = self._login()
            self._token_generation += 1
            return self._token_generation

    def _renew(self) -> bool:
        """POST /v1/auth/token/renew-self; False when the token cannot be renewed."""
        if not self._lease.renewable:
            return False
        try:
            auth = self._call(self.client.auth.token.renew_self, "auth/token/renew-self")["auth"]
        except VaultError:
            return False
        self._lease = _Lease(self.clock(), auth["lease_duration"], auth["renewable"])
        return True

    def _login(self) -> tuple[str, _Lease]:
        if self.auth.method == "token":
            return self._static_token()
        if self.auth.method == "approle":
            secret_id = _read_secret_file(self.auth.secret_id_file, "AppRole secret_id file")
            response = self._call(lambda: self.client.auth.approle.login(
                role_id=self.auth.role_id, secret_id=secret_id, use_token=False,
                mount_point=self.auth.mount or "approle"), "auth/approle/login")
        else:
            jwt = _read_secret_file(self.auth.token_file, "Kubernetes service account token")
            response = self._call(lambda: self.client.auth.kubernetes.login(
                role=self.auth.role, jwt=jwt, use_token=False,
                mount_point=self.auth.mount or "kubernetes"), "auth/kubernetes/login")
        auth = response["auth"]
        return auth["client_token"], _Lease(self.clock(), auth["lease_duration"], auth["renewable"])

    def _static_token(self) -> tuple[str, _Lease]:
        """A given token: read again on each login, so a rotated token file is picked up."""
        if self.auth.token_file:
            token = _read_secret_file(self.auth.token_file, "Vault token file")
        else:
            token = self.environ.get("VAULT_TOKEN")
            if not token:
                raise VaultError("no Vault token: set VAULT_TOKEN or vault.auth.token_file")
        self.client.token = token
        data = self._call(self.client.auth.token.lookup_self, "auth/token/lookup-self")["data"]
        return token, _Lease(self.clock(), data.get("ttl") or 0, bool(data.get("renewable")))


def _rfc3339(text: str | None) -> datetime | None:
    """Vault's times carry nanoseconds; Python's parser takes at most microseconds."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00"))
    except ValueError:
        return None


def _read_secret_file(path: Path | None, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except (OSError, TypeError) as exc:
        raise VaultError(f"cannot read {what} {path}: {getattr(exc, 'strerror', exc)}") from None
