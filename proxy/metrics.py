"""Prometheus metrics, and the listener that serves them with /healthz and /readyz.

Label values come only from the policy (rule and key names) and from fixed vocabularies (providers,
operations, actions, outcomes, refusal reasons): never from bucket or object names, never from secrets.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector,
                               ProcessCollector, generate_latest)

from keycourier import __version__
from keycourier.refusals import REASONS

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # CPU, memory, open files of keycourier's own process
PlatformCollector(registry=REGISTRY)
# multiprocess_mode: how --workers sums a gauge over its workers (ignored with one process).
BUILD_INFO = Gauge("keycourier_build_info", "The running keycourier's version (always 1)", ["version"], registry=REGISTRY,
                   multiprocess_mode="livemax")
BUILD_INFO.labels(__version__).set(1)

# Label values alerts and dashboards query: their series exist from the start, at 0, so `rate()` and
# `increase()` see the first event instead of a series appearing out of nothing.
VAULT_OUTCOMES = ("ok", "not_found", "denied", "sealed", "tls", "unreachable", "error")
KEY_CACHE_RESULTS = ("hit", "miss", "stale")
RELOAD_OUTCOMES = ("success", "failure")
CLOSED_REASONS = ("unnamed_endpoint_address", "became_endpoint")
# Transfers through keycourier last from milliseconds (small calls) to many minutes (multi-GiB bodies).
TRANSFER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)

REQUESTS = Counter("keycourier_requests", "Requests to policy endpoints, by what keycourier decided",
                   ["provider", "operation", "rule", "action", "outcome"], registry=REGISTRY)
REFUSALS = Counter("keycourier_refusals", "Requests keycourier answered itself, by reason", ["reason"], registry=REGISTRY)
KEY_VERSION_FALLBACKS = Counter("keycourier_key_version_fallbacks",
                                "Reads tried with more than one key version, by key and which served: the first "
                                "try, an older version, no key (plaintext), or none", ["key", "outcome"],
                                registry=REGISTRY)
CONNECTIONS_CLOSED = Counter("keycourier_connections_closed",
                             "Connections to object stores keycourier closed instead of relaying, by reason",
                             ["reason"], registry=REGISTRY)
KEYS_INJECTED = Counter("keycourier_keys_injected", "Keys added to forwarded requests", ["provider", "key"], registry=REGISTRY)
TRANSLATIONS = Counter("keycourier_translations", "Client keys carried over from one dialect into another",
                       ["from_dialect", "to_dialect"], registry=REGISTRY)
VAULT_REQUESTS = Counter("keycourier_vault_requests", "Vault reads and logins, by outcome", ["outcome"], registry=REGISTRY)
VAULT_UP = Gauge("keycourier_vault_up", "1 if Vault answered keycourier's last request, 0 if that request failed",
                 registry=REGISTRY, multiprocess_mode="livemin")
VAULT_SECONDS = Histogram("keycourier_vault_request_seconds", "Time of Vault reads and logins", registry=REGISTRY)
KEY_CACHE = Counter("keycourier_key_cache", "Key and credential look-ups, by cache result", ["result"], registry=REGISTRY)
UPSTREAM_SECONDS = Histogram("keycourier_upstream_seconds", "Time from request start to the upstream's answer",
                             ["provider"], buckets=TRANSFER_BUCKETS, registry=REGISTRY)
BODY_BYTES = Counter("keycourier_body_bytes", "Body bytes streamed through keycourier (counted a MiB at a time)",
                     ["provider", "direction"], registry=REGISTRY)
POLICY_RELOADS = Counter("keycourier_policy_reloads", "Policy file reloads, by outcome", ["outcome"], registry=REGISTRY)
POLICY_RULES = Gauge("keycourier_policy_rules", "Rules in the policy in force", registry=REGISTRY,
                     multiprocess_mode="livemax")
POLICY_LOADED = Gauge("keycourier_policy_loaded_timestamp_seconds", "When the policy in force was loaded",
                      registry=REGISTRY, multiprocess_mode="livemin")

NONE = "none"
_children: dict[tuple, object] = {}


def child(metric, *values: str):
    """`metric.labels(*values)`, looked up once: labels() checks its arguments and takes a lock on every call,
    and a request counts several metrics. Label values are bounded (see above), so this dict is too."""
    try:
        return _children[metric, values]
    except KeyError:
        found = _children[metric, values] = metric.labels(*values)
        return found


# The series of the label values above, at 0 from the start.
for _counter, _values in ((REFUSALS, REASONS), (VAULT_REQUESTS, VAULT_OUTCOMES), (KEY_CACHE, KEY_CACHE_RESULTS),
                          (POLICY_RELOADS, RELOAD_OUTCOMES), (CONNECTIONS_CLOSED, CLOSED_REASONS)):
    for _value in _values:
        child(_counter, _value)


def record_decision(audit) -> None:
    """One intercepted request, from the pipeline's audit record."""
    child(REQUESTS, audit.provider, audit.operation or NONE, audit.rule or NONE, audit.action or NONE,
          audit.outcome).inc()
    if audit.reason:
        child(REFUSALS, audit.reason).inc()
    elif audit.key:
        child(KEYS_INJECTED, audit.provider, audit.key).inc()
    if audit.translation and not audit.reason:
        child(TRANSLATIONS, *audit.translation.split("->")).inc()


def record_policy(rules: int, reload_outcome: str | None) -> None:
    if reload_outcome:
        child(POLICY_RELOADS, reload_outcome).inc()
    if reload_outcome != "failure":
        POLICY_RULES.set(rules)
        POLICY_LOADED.set_to_current_time()


COUNT_EVERY_BYTES = 1024 * 1024  # body bytes reach the counter a MiB at a time: a counter update per chunk costs


def counting(provider: str, direction: str, transform: Callable[[bytes], bytes] | None = None) -> Callable[[bytes], bytes]:
    """A body stream callable that counts the bytes it passes on (all of them once mitmproxy calls it with b"",
    at the body's end)."""
    counter = child(BODY_BYTES, provider, direction)
    uncounted = 0

    def count(data: bytes) -> bytes:
        nonlocal uncounted
        out = transform(data) if transform else data
        uncounted += len(out)
        if uncounted >= COUNT_EVERY_BYTES or not data:
            counter.inc(uncounted)
            uncounted = 0
        return out

    return count


class _Handler(BaseHTTPRequestHandler):
    readiness: Callable[[], str | None]
    registry: CollectorRegistry

    def do_GET(self):
        if self.path == "/metrics":
            self._answer(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        elif self.path == "/healthz":
            self._answer(200, b"ok\n")
        elif self.path == "/readyz":
            problem = self.readiness()
            self._answer(503 if problem else 200, f"{problem or 'ready'}\n".encode())
        else:
            self._answer(404, b"not found: /metrics, /healthz, /readyz\n")

    def _answer(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8"):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # scrapes every few seconds would drown the log
        pass


def multiprocess_registry(directory: str) -> CollectorRegistry:
    """What --workers serves: every worker's metrics (written to `directory` by prometheus-client), summed, and the
    supervisor's own process metrics."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    ProcessCollector(registry=registry)
    return registry


def serve(host: str, port: int, readiness: Callable[[], str | None],
          registry: CollectorRegistry = REGISTRY) -> ThreadingHTTPServer:
    """Serves /metrics, /healthz (alive) and /readyz (`readiness` returns why not ready, or None)."""
    handler = type("Handler", (_Handler,), {"readiness": staticmethod(readiness), "registry": registry})
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, name="keycourier-metrics", daemon=True).start()
    return server
