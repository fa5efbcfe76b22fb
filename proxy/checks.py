"""What `keycourier check` warns of: a valid policy that will fail, or do nothing, at run time."""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping

from keycourier.policy import Policy, Rule, SecretSpec, glob_regex, is_glob


def warnings(policy: Policy, environ: Mapping[str, str] = os.environ) -> list[str]:
    """One `file:line: warning: reason` line per problem, in line order."""
    found = [*_vault_problems(policy, environ), *_secret_file_problems(policy), *_rule_problems(policy)]
    return [f"{policy.source}:{line}: warning: {reason}" for line, reason in sorted(found)]


def _vault_problems(policy: Policy, environ: Mapping[str, str]) -> Iterator[tuple[int, str]]:
    users = [s for s in (*policy.keys.values(), *policy.credentials.values()) if s.vault]
    if not users:
        return
    addr = (policy.vault and policy.vault.addr) or environ.get("VAULT_ADDR")
    if not addr:
        for spec in users:
            yield spec.line, f"{spec.name!r} is read from Vault, but there is no vault.addr and VAULT_ADDR is not set"
    elif not addr.startswith("https://"):
        yield users[0].line, f"Vault address {addr} is not https: keycourier refuses it, so no Vault key can be read"
    auth = policy.vault.auth if policy.vault else None
    for path, what in ((auth and auth.token_file, "Vault token file"), (auth and auth.secret_id_file, "AppRole secret_id file")):
        if path and not path.exists():
            yield users[0].line, f"{what} {path} does not exist (yet)"


def _secret_file_problems(policy: Policy) -> Iterator[tuple[int, str]]:
    for kind, specs in (("key", policy.keys), ("credential", policy.credentials)):
        for spec in specs.values():
            if spec.file:
                problem = _file_problem(spec)
                if problem:
                    yield spec.line, f"{kind} {spec.name!r}: {problem}"


def _file_problem(spec: SecretSpec) -> str | None:
    try:
        mode = spec.file.stat().st_mode
    except OSError as exc:
        return f"cannot read {spec.file}: {exc.strerror}"
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"{spec.file} is readable by group/others (mode {stat.S_IMODE(mode):o}): keycourier refuses it; chmod 600 it"
    return None


def _rule_problems(policy: Policy) -> Iterator[tuple[int, str]]:
    providers = {endpoint.provider for endpoint in policy.endpoints}
    for index, rule in enumerate(policy.rules):
        if rule.provider != "*" and rule.provider not in providers:
            yield rule.line, f"{rule.name} is for {rule.provider}, but no endpoint has provider {rule.provider}: it can never match"
        shadow = next((earlier for earlier in policy.rules[:index] if _covers(earlier, rule)), None)
        if shadow:
            yield rule.line, f"{rule.name} can never match: {shadow.name} (line {shadow.line}) comes first and covers all it covers"


def _covers(first: Rule, later: Rule) -> bool:
    """Every request `later` matches, `first` matches too (first match wins, so `later` is dead)."""
    return (first.provider in ("*", later.provider) and _glob_covers(first.account, later.account)
            and _glob_covers(first.bucket, later.bucket) and later.prefix.startswith(first.prefix))


def _glob_covers(wide: str, narrow: str) -> bool:
    """Conservative: true only when certain (`*`, the same glob, or a literal the glob matches)."""
    return wide == "*" or wide.lower() == narrow.lower() or (not is_glob(narrow) and bool(glob_regex(wide).fullmatch(narrow)))
