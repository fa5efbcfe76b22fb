"""Vault access through hvac: login (token, AppRole) and KV v2 reads. Configured like the Vault CLI."""
from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path

import hvac
import hvac.exceptions
import requests

from proxy import metrics
from proxy.policy import VaultConfig, VaultSecretRef


class VaultError(Exception):
    """A reason safe to show: names paths and addresses, never tokens or secret values."""

    def __init__(self, reason: str, outcome: str = "error"):
        super().__init__(reason)
        self.outcome = outcome  # metric label: ok, not_found, denied, sealed, tls, unreachable, error


class Vault:
    """One authenticated hvac client. Settings come from policies.yaml, else from VAULT_ADDR,
    VAULT_TOKEN, VAULT_CACERT and VAULT_NAMESPACE, as the Vault CLI and hvac users expect."""

    def __init__(self, config: VaultConfig | None, environ: Mapping[str, str] = os.environ):
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

    def read_kv2(self, ref: VaultSecretRef) -> tuple[dict, int]:
        """GET /v1/<mount>/data/<path>[?version=N]: the secret's fields and its version."""
        where = f"{ref.api_path}" + (f" version {ref.version}" if ref.version else "")
        response = self._with_login(
            lambda: self.client.secrets.kv.v2.read_secret_version(
                path=ref.path, mount_point=ref.mount, version=ref.version, raise_on_deleted_version=True
            ),
            where,
        )
        data = response["data"]
        return data["data"] or {}, data["metadata"]["version"]

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
            if self.auth.method == "token" or exc.outcome != "denied":
                raise
        # The token may have expired since login: log in again once, then give up.
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
            metrics.VAULT_REQUESTS.labels("ok").inc()
            return result
        metrics.VAULT_REQUESTS.labels(error.outcome).inc()
        raise error

    def _ensure_login(self, stale_generation: int | None = None) -> int:
        """Logs in when there is no token yet, or when the token of `stale_generation` was refused."""
        with self._login_lock:
            if self.client.token and stale_generation != self._token_generation:
                return self._token_generation
            self.client.token = self._login()
            self._token_generation += 1
            return self._token_generation

    def _login(self) -> str:
        if self.auth.method == "token":
            if self.auth.token_file:
                return _read_secret_file(self.auth.token_file, "Vault token file")
            token = self.environ.get("VAULT_TOKEN")
            if not token:
                raise VaultError("no Vault token: set VAULT_TOKEN or vault.auth.token_file")
            return token
        secret_id = _read_secret_file(self.auth.secret_id_file, "AppRole secret_id file")
        response = self._call(lambda: self.client.auth.approle.login(role_id=self.auth.role_id, secret_id=secret_id,
                                                                     use_token=False), "auth/approle/login")
        return response["auth"]["client_token"]


def _read_secret_file(path: Path | None, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except (OSError, TypeError) as exc:
        raise VaultError(f"cannot read {what} {path}: {getattr(exc, 'strerror', exc)}") from None
