"""How a step stops a request: it raises Refused, and nothing is forwarded."""
from __future__ import annotations

from dataclasses import dataclass

# Why a request was refused: a metric label, so a fixed vocabulary.
REASONS = ("deny", "no_rule", "tls", "key_unavailable", "bad_signature", "client_key", "presigned", "unclassifiable",
           "too_large", "unencryptable", "translation")


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str  # the provider's error code, so SDKs show it as they would the provider's own
    message: str  # safe to show: names rules and keys, never their material
    reason: str  # one of REASONS


class Refused(Exception):
    def __init__(self, status: int, code: str, message: str, reason: str):
        super().__init__(message)
        assert reason in REASONS, reason
        self.refusal = Refusal(status, code, message, reason)
