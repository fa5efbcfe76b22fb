"""/readyz is judged from Vault's last answers, never by asking Vault per probe."""
from __future__ import annotations

from keycourier import metrics
from keycourier.keys import Secrets
from keycourier.policy import parse_policy
from keycourier.vault import Contact

POLICY = parse_policy("""version: 1
endpoints: []
keys: {k: {vault: {path: secret/data/k}}}
key_cache_ttl: 60
key_cache_stale_ttl: 30
rules: []
""")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class CountingVault:
    """A Vault stand-in: counts health requests, answers as told."""

    def __init__(self, clock):
        self.contact = Contact(clock)
        self.health_requests = 0
        self.up = True

    def problem(self):
        self.health_requests += 1
        self.contact.record("ok" if self.up else "unreachable", "Vault at https://vault:8200 is unreachable")


def test_probes_never_ask_vault_and_follow_its_last_answers():
    clock = Clock()
    vault = CountingVault(clock)
    secrets = Secrets(vault_factory=lambda policy: vault)
    assert secrets.vault_problem(POLICY) == "Vault not contacted yet"
    secrets.check_vault(POLICY, quiet_seconds=10)
    assert vault.health_requests == 1 and secrets.vault_problem(POLICY) is None
    assert metrics.REGISTRY.get_sample_value("keycourier_vault_up") == 1
    for _ in range(50):
        secrets.vault_problem(POLICY)
    secrets.check_vault(POLICY, quiet_seconds=10)  # Vault answered just now: not asked again
    assert vault.health_requests == 1

    vault.up = False
    clock.now += 10
    secrets.check_vault(POLICY, quiet_seconds=10)
    assert vault.health_requests == 2 and metrics.REGISTRY.get_sample_value("keycourier_vault_up") == 0
    assert secrets.vault_problem(POLICY) is None  # keys it gave are still cached (ttl + stale ttl: 90 s)
    clock.now += 81
    assert secrets.vault_problem(POLICY) == "Vault at https://vault:8200 is unreachable"
    vault.up = True
    secrets.check_vault(POLICY, quiet_seconds=10)
    assert secrets.vault_problem(POLICY) is None


def test_a_policy_without_vault_is_ready_and_never_asks():
    secrets = Secrets(vault_factory=lambda policy: (_ for _ in ()).throw(AssertionError("no Vault wanted")))
    policy = parse_policy("version: 1\nendpoints: []\nrules: []\n")
    secrets.check_vault(policy, quiet_seconds=0)
    assert secrets.vault_problem(policy) is None


def test_answers_that_refuse_still_show_vault_is_up():
    clock = Clock()
    contact = Contact(clock)
    contact.record("unreachable", "down")
    contact.record("not_found")
    assert contact.problem(grace=0) is None and contact.quiet_for() == 0
