"""The mitmproxy addon: adapts mitmproxy's hooks to keycourier.pipeline. No decisions are made here.

Also a mitmproxy script: `mitmdump -s addons/keycourier.py --set keycourier_policies=policies.yaml`.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import sys
import weakref
from dataclasses import replace
from http import HTTPStatus
from pathlib import Path

if __name__.startswith("__mitmproxy_script__"):
    # mitmproxy puts a script's folder first on sys.path; this file's name would shadow the keycourier package.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != _here]

from mitmproxy import ctx, exceptions, http
from mitmproxy.addons.next_layer import NeedsMoreData, NextLayer
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layers, mode_specs
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.layers.tcp import TcpMessageInjected
from mitmproxy.proxy.layers.tls import parse_client_hello
from mitmproxy.proxy.utils import expect

from keycourier import logs, metrics, pipeline
from keycourier.audit import FORMATS, audit_record, format_record
from keycourier.destination import Destination, EndpointAddresses, Interception, intercept
from keycourier.fallback import ATTEMPT_HEADER, FallbackForwarder, Parked
from keycourier.fallback import TOKEN_HEADER as FALLBACK_TOKEN_HEADER
from keycourier.hostnames import is_ip_literal
from keycourier.keys import NotCached, Secrets
from keycourier.message import Request
from keycourier.policy import PolicyError, PolicyFile
from keycourier.response import explain_upstream_error, header_safe, redact_headers, translate_response
from keycourier.scrub import KeyScrubber, keys_in
from keycourier.sink import TOKEN_HEADER, Answer, RefusalSink, framing_headers
from keycourier.tls import upstream_context
from keycourier.versions import KeyChoice, KeyVersions

log = logging.getLogger("keycourier")

POLICY_POLL_SECONDS = 1.0
ENDPOINT_RESOLVE_SECONDS = 30.0
VAULT_CHECK_SECONDS = 10.0  # Vault's health is asked after this long without any Vault request (readiness)
# Options keycourier's guarantees rest on: an object store's connection is never relayed raw (a 101 answer
# would switch to raw TCP), a tunnel's address is known (connected) before keycourier decides on it, and
# mitmdump's own flow lines (object names) are off: the audit line replaces them.
REQUIRED_OPTIONS = {"rawtcp": False, "connection_strategy": "eager", "ssl_insecure": False, "flow_detail": 0}


class KeyCourier:
    def __init__(self, secrets: Secrets | None = None, *, as_script: bool = False):
        self.secrets = secrets or Secrets()
        self.as_script = as_script  # loaded by mitmdump -s, after mitmproxy's own addons
        self.policy_file: PolicyFile | None = None
        self.addresses = EndpointAddresses()
        self.versions = KeyVersions()  # which key version objects were last read or written with
        self.generation = 0  # counts policies and endpoint addresses taking effect; tunnels re-check on change
        self._watcher: asyncio.Task | None = None
        # Decisions hold key material until it is sent: kept beside the flow, never in flow.metadata,
        # which mitmproxy saves and prints.
        self._decisions: weakref.WeakKeyDictionary[http.HTTPFlow, pipeline.Forward | pipeline.Refuse] = weakref.WeakKeyDictionary()
        self._parked: weakref.WeakKeyDictionary[http.HTTPFlow, str] = weakref.WeakKeyDictionary()
        # The start of each provider error the client got (scrubbed), to explain it in the log.
        self._error_starts: weakref.WeakKeyDictionary[http.HTTPFlow, bytearray] = weakref.WeakKeyDictionary()
        self._tunnel_servers: set[str] = set()
        self._served: weakref.WeakKeyDictionary[http.HTTPFlow, KeyChoice] = weakref.WeakKeyDictionary()
        self._metrics_server = None
        self._sink: RefusalSink | None = None
        self._fallback: FallbackForwarder | None = None
        self.draining = False  # set on SIGTERM (keycourier.addons.drain): unready from then on

    def load(self, loader):
        loader.add_option("keycourier_policies", str, "", "Path of keycourier's policies.yaml.")
        loader.add_option("keycourier_metrics", str, "", "host:port serving /metrics, /healthz and /readyz; empty: none.")
        loader.add_option("keycourier_ready_file", str, "", "A file kept holding why this worker is not ready "
                          "(empty when ready), for keycourier run --workers; empty: none.")
        loader.add_option("keycourier_log_format", str, "text", "Audit log lines as text or json.", choices=FORMATS)
        logs.install()

    def configure(self, updated):
        if self.as_script and "save_stream_file" in ctx.options and ctx.options.save_stream_file:
            # Loaded after mitmproxy's own addons, keycourier would redact a failed flow's key headers only after
            # mitmproxy's saver has written them: `keycourier run --save-flows` orders the addons safely.
            raise exceptions.OptionsError("keycourier as a mitmdump script cannot save flows without key material: "
                                          "use keycourier run --save-flows")
        for name, required in REQUIRED_OPTIONS.items():
            if name in ctx.options and getattr(ctx.options, name) != required:
                if name == "ssl_insecure":
                    raise exceptions.OptionsError("keycourier sends keys only over verified TLS: ssl_insecure cannot be set")
                ctx.options.update(**{name: required})
        if "keycourier_policies" not in updated:
            return
        try:
            self.policy_file = PolicyFile(ctx.options.keycourier_policies)
        except PolicyError as exc:
            raise exceptions.OptionsError(f"invalid policy: {exc}") from None
        self._resolve_endpoints()
        self._policy_took_effect(reload_outcome=None)

    def running(self):
        layer_decider = ctx.master.addons.get("nextlayer")
        if not isinstance(layer_decider, EndpointLayers):
            # Loaded as a script beside mitmproxy's own: keycourier decides the layers of object stores' connections.
            if layer_decider is not None:
                ctx.master.addons.remove(layer_decider)
            ctx.master.addons.add(EndpointLayers(self))
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_policy())
        if ctx.options.keycourier_metrics and self._metrics_server is None:
            host, _, port = ctx.options.keycourier_metrics.rpartition(":")
            self._metrics_server = metrics.serve(host, int(port), self._readiness)
            log.info(f"metrics, /healthz and /readyz at http://{ctx.options.keycourier_metrics}")

    def done(self):
        if self._watcher:
            self._watcher.cancel()
        for listener in (self._sink, self._fallback):
            if listener:
                listener.close()
        if self._metrics_server:
            self._metrics_server.shutdown()

    def _readiness(self) -> str | None:
        if self.draining:
            return "stopping: draining requests in flight"
        return self.secrets.vault_problem(self.policy_file.current)

    async def _watch_policy(self):
        since_resolved = 0.0
        while True:
            if ctx.options.keycourier_ready_file:  # a worker of keycourier run --workers: its supervisor reads it
                await asyncio.to_thread(Path(ctx.options.keycourier_ready_file).write_text, self._readiness() or "")
            await asyncio.sleep(POLICY_POLL_SECONDS)
            since_resolved += POLICY_POLL_SECONDS
            result = await asyncio.to_thread(self.policy_file.reload_if_changed)
            if isinstance(result, PolicyError):
                metrics.record_policy(len(self.policy_file.current.rules), "failure")
                log.error(f"policy reload refused, keeping the previous policy: {result}")
            if result is True or since_resolved >= ENDPOINT_RESOLVE_SECONDS:
                await asyncio.to_thread(self._resolve_endpoints)
                since_resolved = 0.0
            if result is True:
                self._policy_took_effect(reload_outcome="success")
            await asyncio.to_thread(self.secrets.check_vault, self.policy_file.current, VAULT_CHECK_SECONDS)

    def _resolve_endpoints(self):
        unresolved = self.addresses.refresh(self.policy_file.current)
        self.generation += 1
        if unresolved:
            log.warning(f"endpoint host names that do not resolve (matched by name only): {', '.join(sorted(unresolved))}")

    def _policy_took_effect(self, reload_outcome: str | None):
        policy = self.policy_file.current
        self.generation += 1
        metrics.record_policy(len(policy.rules), reload_outcome)
        log.info(f"policy {policy.source} in force: {len(policy.rules)} rules, {len(policy.endpoints)} endpoints")

    def intercept(self, destination: Destination) -> Interception:
        return intercept(self.policy_file.current, self.addresses, destination)

    # --- connections --------------------------------------------------------------------------

    def connection_layer(self, context, data_client: bytes, data_server: bytes):
        """The layer for a connection to a known host: an object store's is parsed as HTTP (over TLS if the
        client speaks it), never relayed raw; any other host's is relayed untouched while it stays so."""
        destination = connection_destination(context, data_client, data_server)
        interception = self.intercept(destination)
        if interception.endpoint is None:
            decided = self.generation

            def still_untouched() -> bool:
                nonlocal decided
                if decided != self.generation:
                    if self.intercept(destination).endpoint is not None:
                        log.warning(f"closing a tunnel to {destination.host}:{destination.port}: "
                                    "a policy change made it an object store")
                        metrics.child(metrics.CONNECTIONS_CLOSED, "became_endpoint").inc()
                        return False
                    decided = self.generation
                return True

            return UntouchedTunnel(context, still_untouched)
        if starts_like_tls_record(data_client):
            server_tls = layers.ServerTLSLayer(context)
            server_tls.child_layer = layers.ClientTLSLayer(context)
            return server_tls
        return layers.HttpLayer(context, HTTPMode.transparent)

    def http_connect(self, flow: http.HTTPFlow):
        # (A CONNECT inside a tunnel never gets here: mitmproxy answers it 400 and closes.)
        self._tunnel_servers.add(flow.server_conn.id)

    async def server_connect(self, data):
        """Before any connection to a host the policy does not name: closed if the name reaches an
        endpoint's address. A plain-HTTP request's connection goes to the address checked (no second
        resolution an attacker's DNS could answer differently); a tunnel's is checked once connected."""
        tunnel = data.server.id in self._tunnel_servers
        self._tunnel_servers.discard(data.server.id)
        host, port = data.server.address
        destination = Destination.of(host, port)
        if self.intercept(destination).endpoint is not None:
            return
        try:
            addresses = [destination.host] if is_ip_literal(destination.host) else await resolve(host, port)
        except OSError:
            return  # mitmproxy reports the failure to connect
        for address in addresses:
            interception = self.intercept(replace(destination, address=address))
            if interception.endpoint is not None:
                log.warning(f"refused a connection: {interception.refusal}")
                metrics.child(metrics.CONNECTIONS_CLOSED, "unnamed_endpoint_address").inc()
                data.server.error = f"keycourier: {interception.refusal}"
                return
        if not tunnel:
            data.server.address = (addresses[0], port)

    # --- requests -----------------------------------------------------------------------------

    async def requestheaders(self, flow: http.HTTPFlow):
        if flow.response or flow.error or not flow.live:
            return
        destination = flow_destination(flow)
        request = plain_request(flow.request, destination.host)
        decision = await self._decide(request, destination, client_tls=flow.client_conn.tls_established)
        self._decisions[flow] = decision
        if decision.audit.provider:
            metrics.record_decision(decision.audit)
        if isinstance(decision, pipeline.Refuse):
            answer = Answer(decision.refusal.status, {"content-type": decision.content_type,
                                                      "x-keycourier-error": header_safe(decision.refusal.message)},
                            b"" if request.method == "HEAD" else decision.body)
            if request.header("content-length") in (None, "0") and not request.header("transfer-encoding"):
                flow.response = http.Response.make(answer.status, answer.body, answer.headers)
            else:
                self._send_to_sink(flow, answer)
            return
        if decision.attempts:
            self._send_to_fallback(flow, decision)
        elif decision.audit.provider:
            apply_request(flow.request, decision.request, changed=decision.request is not request)
            flow.request.stream = metrics.counting(decision.audit.provider, "upload", decision.body)
        else:
            flow.request.stream = decision.body or True

    async def _decide(self, request: Request, destination: Destination, *, client_tls: bool):
        """The pipeline, run inline; when it needs a key or credential not yet cached, this request (and no
        other) waits for the load, which runs in the secrets' own threads."""
        while True:
            try:
                return pipeline.handle_request(request, client_tls=client_tls, destination=destination,
                                               policy=self.policy_file.current, addresses=self.addresses,
                                               secrets=self.secrets, versions=self.versions)
            except NotCached as missing:
                await asyncio.wait([asyncio.wrap_future(load) for load in missing.loads])

    def _send_to_sink(self, flow: http.HTTPFlow, answer: Answer):
        """A refused request with a body: its body is streamed into the sink, which answers (see keycourier.sink)."""
        if self._sink is None:
            self._sink = RefusalSink()
        self._parked[flow] = token = self._sink.park(answer)
        host, port = self._sink.address
        # The sink serves one method: the refused one may be any (PROPFIND, LOCK, ...).
        flow.request.method, flow.request.scheme, flow.request.host, flow.request.port = "PUT", "http", host, port
        flow.request.authority = ""
        flow.request.headers = http.Headers(_encode([("host", f"{host}:{port}"), (TOKEN_HEADER, token),
                                                     *framing_headers(flow.request.headers.items(multi=True))]))
        flow.request.stream = True

    def _send_to_fallback(self, flow: http.HTTPFlow, decision: pipeline.Forward):
        """A read whose object may be under an older key version: tried by the fallback forwarder (keycourier.fallback)."""
        if self._fallback is None:
            self._fallback = FallbackForwarder(upstream_context(ctx.options.ssl_verify_upstream_trusted_ca))
        provider = decision.audit.provider
        judge = functools.partial(pipeline.DIALECTS[provider].read_outcome, source=decision.read.source)
        requests = [attempt.request for attempt in decision.attempts]
        plaintext_at = next((n for n, a in enumerate(decision.attempts) if a.choice.version is None), None)
        token = self._fallback.park(Parked(requests, plaintext_at, judge))
        host, port = self._fallback.address
        flow.request.scheme, flow.request.host, flow.request.port, flow.request.authority = "http", host, port, ""
        flow.request.headers = http.Headers(_encode([("host", f"{host}:{port}"), (FALLBACK_TOKEN_HEADER, token)]))
        flow.request.stream = metrics.counting(provider, "upload")

    def responseheaders(self, flow: http.HTTPFlow):
        self._scrub_request(flow)
        decision = self._decisions.get(flow)
        if not isinstance(decision, pipeline.Forward) or not decision.audit.provider:
            flow.response.headers = _redacted(flow.response.headers, pipeline.SECRET_HEADERS)
            flow.response.stream = True
            return
        if flow.response.status_code == 101:
            flow.kill()  # an object store switching protocols would relay raw bytes: closed
            return
        self._learn_key_version(flow, decision)
        sent = [decision.request, *(attempt.request for attempt in decision.attempts)]
        scrubber = KeyScrubber([key for request in sent for key in keys_in(request.headers, pipeline.SECRET_HEADERS)])
        received = list(flow.response.headers.items(multi=True))
        headers = redact_headers(received, pipeline.SECRET_HEADERS)
        headers += self._read_failure(flow, decision)
        if decision.respond_as:
            headers = translate_response(headers, decision.audit.provider, decision.respond_as)
        body = None
        if decision.envelope:
            reply = decision.envelope.respond(flow.response.status_code, headers)
            headers, body = reply.headers, reply.body
            if reply.error:
                flow.response.status_code, flow.response.reason = reply.status, HTTPStatus(reply.status).phrase
                headers.append(("x-keycourier-error", header_safe(reply.error)))
        if scrubber:
            headers = scrubber.headers(headers)
            if not pipeline.is_object_data(decision.audit, flow.response.status_code):
                encoding = flow.response.headers.get("content-encoding", "identity").lower()
                body = scrubber.stream() if encoding == "identity" else _withheld(headers, flow.response.status_code)
        if headers != received:  # most answers need no change: rebuilding mitmproxy's headers costs per request
            flow.response.headers = http.Headers(_encode(headers))
        flow.response.stream = metrics.counting(decision.audit.provider, "download", body)
        if flow.response.status_code >= 400:
            flow.response.stream = _keeping_start(flow.response.stream, self._error_starts.setdefault(flow, bytearray()))

    def _learn_key_version(self, flow: http.HTTPFlow, decision: pipeline.Forward):
        """Which key version answered (the fallback forwarder says which attempt), remembered for the object."""
        tried = flow.response.headers.pop(ATTEMPT_HEADER, None)
        served = decision.attempts[int(tried)].choice if tried is not None and decision.attempts else None
        ok = flow.response.status_code < 300
        if served:
            self._served[flow] = served
            metrics.child(metrics.KEY_VERSION_FALLBACKS, served.key_name, fallback_outcome(served, int(tried), ok)).inc()
        remembered = served if served and ok else decision.written if ok else None
        if remembered:
            self.versions.remember(remembered)

    def _read_failure(self, flow: http.HTTPFlow, decision: pipeline.Forward) -> list[tuple[str, str]]:
        """A read the provider refused for its key (the provider's own answer is kept). No customer key on the
        object: the client is told which policy option reads it. A version keycourier does not know (a newer
        one, loaded by another replica or `keycourier rotate` first): the key is read from Vault again."""
        if not (decision.read and flow.response.status_code >= 400):
            return []
        headers = {name.lower(): value for name, value in flow.response.headers.items()}
        outcome = pipeline.DIALECTS[decision.audit.provider].read_outcome(flow.response.status_code, headers, b"",
                                                                          source=decision.read.source)
        if outcome == "wrong_key":
            self.secrets.forget_key(self.policy_file.current, decision.read.key_name)
        if outcome != "plaintext" or not decision.read.plaintext_refusal:
            return []
        log.warning(f"{decision.audit.provider} bucket {decision.audit.bucket}: {decision.read.plaintext_refusal}")
        return [("x-keycourier-error", decision.read.plaintext_refusal)]

    def response(self, flow: http.HTTPFlow):
        self._audit(flow)
        decision = self._decisions.get(flow)
        if not isinstance(decision, pipeline.Forward) or not decision.audit.provider:
            return
        metrics.child(metrics.UPSTREAM_SECONDS, decision.audit.provider).observe(
            flow.response.timestamp_start - flow.request.timestamp_start)
        if flow.response.status_code >= 400:
            explanation = explain_upstream_error(decision.audit, flow.response.status_code,
                                                 bytes(self._error_starts.pop(flow, b"")))
            if explanation:
                log.warning(explanation)

    def error(self, flow: http.HTTPFlow):
        self._scrub_request(flow)
        if self._sink and flow in self._parked:
            self._sink.take(self._parked.pop(flow))  # the refused request never reached the sink
        self._audit(flow)

    def _audit(self, flow: http.HTTPFlow):
        """One audit line per intercepted request, once its outcome is known."""
        decision = self._decisions.get(flow)
        if decision is None or not decision.audit.provider:
            return
        refusal = decision.refusal if isinstance(decision, pipeline.Refuse) else None
        audit = decision.audit if refusal or flow.response else replace(decision.audit, outcome="failed")
        served = self._served.get(flow)
        if served:
            audit = replace(audit, key_version=served.version or "none", key_fingerprint=served.fingerprint)
        end = flow.response.timestamp_start if flow.response else (flow.error.timestamp if flow.error else flow.request.timestamp_start)
        record = audit_record(
            flow.request.method, audit, client=f"{flow.client_conn.peername[0]}",
            status=flow.response.status_code if flow.response else None,
            seconds=max(0.0, end - flow.request.timestamp_start),
            message=refusal.message if refusal else (flow.error.msg if flow.error else None))
        log.log(logging.WARNING if refusal or flow.error else logging.INFO,
                format_record(record, ctx.options.keycourier_log_format), extra={"audit": record})

    def _scrub_request(self, flow: http.HTTPFlow):
        """Once sent, key headers are replaced by a marker, so no log or saved flow holds them."""
        decision = self._decisions.get(flow)
        if isinstance(decision, pipeline.Forward) and decision.secret_headers:
            flow.request.headers = _redacted(flow.request.headers, decision.secret_headers)


class EndpointLayers(NextLayer):
    """mitmproxy's layer decisions, but a connection to a known host is decided by keycourier's predicate:
    no mitmproxy option or heuristic (raw-TCP fallback, ignore lists) can relay an object store raw."""

    name = "nextlayer"

    def __init__(self, keycourier: KeyCourier):
        self.keycourier = keycourier

    def _next_layer(self, context, data_client: bytes, data_server: bytes):
        if len(context.layers) > 1 and context.server.address:
            return self.keycourier.connection_layer(context, data_client, data_server)
        return super()._next_layer(context, data_client, data_server)  # how the client talks to keycourier itself


class UntouchedTunnel(layers.TCPLayer):
    """A raw relay to a host that is not an object store, closed before relaying more bytes once a policy
    change makes it one."""

    def __init__(self, context, still_untouched):
        super().__init__(context, ignore=True)
        self.still_untouched = still_untouched

    @expect(events.DataReceived, events.ConnectionClosed, TcpMessageInjected)
    def relay_messages(self, event):
        if isinstance(event, events.DataReceived) and not self.still_untouched():
            self._handle_event = self.done
            yield commands.CloseConnection(self.context.server)
            yield commands.CloseConnection(self.context.client)
            return
        yield from super().relay_messages(event)


def fallback_outcome(served: KeyChoice, tried: int, ok: bool) -> str:
    if not ok:
        return "none"  # no key version served: the provider's own answer went back
    if served.version is None:
        return "plaintext"
    return "first" if tried == 0 else "older"


def connection_destination(context, data_client: bytes, data_server: bytes) -> Destination:
    """Where a client's tunnel goes: the CONNECT target, the TLS server name it asks for, and the address
    mitmproxy connected to (eager: before the client's first byte)."""
    host, port = context.server.address[:2]
    server_name = context.client.sni
    if server_name is None and starts_like_tls_record(data_client):
        try:
            hello = parse_client_hello(data_client)
        except ValueError:
            hello = None  # not TLS after all: parsed as HTTP, or refused
        else:
            if hello is None:
                raise NeedsMoreData
        server_name = hello and hello.sni
    elif not data_client and not data_server:
        raise NeedsMoreData
    peer = context.server.peername
    return Destination.of(host, port, server_name, peer[0] if peer else None)


def flow_destination(flow: http.HTTPFlow) -> Destination:
    request, server = flow.request, flow.server_conn
    reverse = isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode)
    # In reverse mode the client's TLS server name names keycourier itself.
    server_name = None if reverse or not flow.client_conn.tls_established else flow.client_conn.sni
    same_server = server.address is not None and tuple(server.address[:2]) == (request.host, request.port)
    address = server.peername[0] if same_server and server.peername else None
    return Destination.of(request.host, request.port, server_name, address)


async def resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


ERROR_START_BYTES = 4096  # provider error documents name their code in the first few hundred bytes


def _keeping_start(stream, kept: bytearray):
    """The stream transform `stream`, also keeping in `kept` the start of what the client gets."""

    def keep(data: bytes) -> bytes:
        out = stream(data) if callable(stream) else data
        if len(kept) < ERROR_START_BYTES:
            kept.extend(out[: ERROR_START_BYTES - len(kept)])
        return out

    return keep


def _withheld(headers: list[tuple[str, str]], status: int):
    """A compressed answer cannot be scrubbed: its body is withheld, its status and headers kept."""
    headers[:] = [(name, value) for name, value in headers if name.lower() not in ("content-length", "content-encoding")]
    headers += [("content-length", "0"), ("x-keycourier-error",
                                          f"keycourier withheld the provider's compressed {status} answer: it may quote the key")]
    return lambda data: b""


def plain_request(request: http.Request, host: str) -> Request:
    headers = tuple(request.headers.items(multi=True))
    if "host" not in request.headers and request.host_header:
        headers = (("host", request.host_header),) + headers  # HTTP/2 carries it as :authority
    return Request(request.method, request.scheme, host, request.port, request.path, headers)


def apply_request(request: http.Request, plain: Request, *, changed: bool) -> None:
    if changed:
        request.path = plain.target
        request.headers = http.Headers(_encode(plain.headers))
    if request.authority and request.http_version.startswith("HTTP/1"):
        request.authority = ""  # origin-form: the Host header is the only name the provider reads


def _redacted(headers: http.Headers, secret_names) -> http.Headers:
    if not any(name in headers for name in secret_names):
        return headers  # the usual case: nothing to rebuild
    return http.Headers(_encode(redact_headers(tuple(headers.items(multi=True)), secret_names)))


def _encode(headers) -> list[tuple[bytes, bytes]]:
    return [(k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape")) for k, v in headers]


addons = [KeyCourier(as_script=True)]  # what mitmproxy loads from this file as a script
