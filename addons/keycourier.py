"""The mitmproxy addon: adapts mitmproxy's hooks to keycourier.pipeline. No decisions are made here.

Also a mitmproxy script: `mitmdump -s addons/keycourier.py --set keycourier_policies=policies.yaml`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import weakref

if __name__.startswith("__mitmproxy_script__"):
    # mitmproxy puts a script's folder first on sys.path; this file's name would shadow the keycourier package.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != _here]

from mitmproxy import ctx, exceptions, http

from keycourier import metrics, pipeline
from keycourier.audit import FORMATS, audit_record, format_record
from keycourier.keys import Secrets
from keycourier.message import Request
from keycourier.policy import PolicyError, PolicyFile, endpoint_host_regexes
from keycourier.response import ERROR_BODY_LIMIT, explain_upstream_error, header_safe, redact_headers, translate_response
from keycourier.sink import TOKEN_HEADER, Answer, RefusalSink, framing_headers

log = logging.getLogger("keycourier")

POLICY_POLL_SECONDS = 1.0


class KeyCourier:
    def __init__(self, secrets: Secrets | None = None):
        self.secrets = secrets or Secrets()
        self.policy_file: PolicyFile | None = None
        self._watcher: asyncio.Task | None = None
        # Decisions hold key material until it is sent: kept beside the flow, never in flow.metadata,
        # which mitmproxy saves and prints.
        self._decisions: weakref.WeakKeyDictionary[http.HTTPFlow, pipeline.Forward | pipeline.Refuse] = weakref.WeakKeyDictionary()
        self._metrics_server = None
        self._sink: RefusalSink | None = None

    def load(self, loader):
        loader.add_option("keycourier_policies", str, "", "Path of keycourier's policies.yaml.")
        loader.add_option("keycourier_metrics", str, "", "host:port serving /metrics, /healthz and /readyz; empty: none.")
        loader.add_option("keycourier_log_format", str, "text", "Audit log lines as text or json.", choices=FORMATS)

    def configure(self, updated):
        if "keycourier_policies" not in updated:
            return
        try:
            self.policy_file = PolicyFile(ctx.options.keycourier_policies)
        except PolicyError as exc:
            raise exceptions.OptionsError(f"invalid policy: {exc}") from None
        self._policy_took_effect(reload_outcome=None)

    def running(self):
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_policy())
        if ctx.options.keycourier_metrics and self._metrics_server is None:
            host, _, port = ctx.options.keycourier_metrics.rpartition(":")
            self._metrics_server = metrics.serve(host, int(port), self._readiness)
            log.info(f"metrics, /healthz and /readyz at http://{ctx.options.keycourier_metrics}")

    def done(self):
        if self._watcher:
            self._watcher.cancel()
        if self._sink:
            self._sink.close()
        if self._metrics_server:
            self._metrics_server.shutdown()

    def _readiness(self) -> str | None:
        return self.secrets.vault_problem(self.policy_file.current)

    async def _watch_policy(self):
        while True:
            await asyncio.sleep(POLICY_POLL_SECONDS)
            result = await asyncio.to_thread(self.policy_file.reload_if_changed)
            if isinstance(result, PolicyError):
                metrics.record_policy(len(self.policy_file.current.rules), "failure")
                log.error(f"policy reload refused, keeping the previous policy: {result}")
            elif result:
                self._policy_took_effect(reload_outcome="success")

    def _policy_took_effect(self, reload_outcome: str | None):
        policy = self.policy_file.current
        metrics.record_policy(len(policy.rules), reload_outcome)
        # Only the policy's endpoints are intercepted; every other host is tunnelled untouched.
        ctx.options.update(allow_hosts=endpoint_host_regexes(policy) or [r"^$"])
        log.info(f"policy {policy.source} in force: {len(policy.rules)} rules, {len(policy.endpoints)} endpoints")

    async def requestheaders(self, flow: http.HTTPFlow):
        if flow.response or flow.error or not flow.live:
            return
        request = plain_request(flow.request)
        decision = await asyncio.to_thread(
            pipeline.handle_request, request, client_tls=flow.client_conn.tls_established,
            policy=self.policy_file.current, secrets=self.secrets,
        )
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
        if decision.request != request:
            apply_request(flow.request, decision.request)
        if decision.audit.provider:
            flow.request.stream = metrics.counting(decision.audit.provider, "upload", decision.body)
        else:
            flow.request.stream = decision.body or True

    def _send_to_sink(self, flow: http.HTTPFlow, answer: Answer):
        """A refused request with a body: its body is streamed into the sink, which answers (see proxy.sink)."""
        if self._sink is None:
            self._sink = RefusalSink()
        token = self._sink.park(answer)
        host, port = self._sink.address
        flow.request.scheme, flow.request.host, flow.request.port = "http", host, port
        flow.request.headers = http.Headers(_encode([("host", f"{host}:{port}"), (TOKEN_HEADER, token),
                                                     *framing_headers(flow.request.headers.items(multi=True))]))
        flow.request.stream = True

    def responseheaders(self, flow: http.HTTPFlow):
        self._scrub(flow)
        decision = self._decisions.get(flow)
        if not isinstance(decision, pipeline.Forward) or flow.response.stream:
            return
        if decision.respond_as:
            flow.response.headers = http.Headers(_encode(translate_response(
                list(flow.response.headers.items(multi=True)), decision.audit.provider, decision.respond_as)))
        # Provider errors are small and their code is in the body: keep them whole to explain them.
        is_small_error = flow.response.status_code >= 400 and int(flow.response.headers.get("content-length", "0") or 0) <= ERROR_BODY_LIMIT
        if not is_small_error:
            flow.response.stream = metrics.counting(decision.audit.provider, "download") if decision.audit.provider else True

    def response(self, flow: http.HTTPFlow):
        self._audit(flow)
        decision = self._decisions.get(flow)
        if not isinstance(decision, pipeline.Forward) or not decision.audit.provider:
            return
        metrics.UPSTREAM_SECONDS.labels(decision.audit.provider).observe(
            flow.response.timestamp_start - flow.request.timestamp_start)
        if flow.response.status_code >= 400:
            explanation = explain_upstream_error(decision.audit, flow.response.status_code, flow.response.content or b"")
            if explanation:
                log.warning(explanation)

    def error(self, flow: http.HTTPFlow):
        self._scrub(flow)
        self._audit(flow)

    def _audit(self, flow: http.HTTPFlow):
        """One audit line per intercepted request, once its outcome is known."""
        decision = self._decisions.get(flow)
        if decision is None or not decision.audit.provider:
            return
        refusal = decision.refusal if isinstance(decision, pipeline.Refuse) else None
        end = flow.response.timestamp_start if flow.response else (flow.error.timestamp if flow.error else flow.request.timestamp_start)
        record = audit_record(
            plain_request(flow.request), decision.audit, client=f"{flow.client_conn.peername[0]}",
            status=flow.response.status_code if flow.response else None,
            seconds=max(0.0, end - flow.request.timestamp_start),
            message=refusal.message if refusal else (flow.error.msg if flow.error else None))
        log.log(logging.WARNING if refusal or flow.error else logging.INFO,
                format_record(record, ctx.options.keycourier_log_format))

    def _scrub(self, flow: http.HTTPFlow):
        """Once sent, key headers are replaced by a marker, so no log or saved flow holds them."""
        decision = self._decisions.get(flow)
        if isinstance(decision, pipeline.Forward) and decision.secret_headers:
            flow.request.headers = _redacted(flow.request.headers, decision.secret_headers)
        if flow.response:
            flow.response.headers = _redacted(flow.response.headers, pipeline.SECRET_HEADERS)


def plain_request(request: http.Request) -> Request:
    headers = tuple(request.headers.items(multi=True))
    if "host" not in request.headers and request.host_header:
        headers = (("host", request.host_header),) + headers  # HTTP/2 carries it as :authority
    return Request(request.method, request.scheme, request.host, request.port, request.path, headers)


def apply_request(request: http.Request, plain: Request) -> None:
    request.path = plain.target
    request.headers = http.Headers(_encode(plain.headers))


def _redacted(headers: http.Headers, secret_names) -> http.Headers:
    return http.Headers(_encode(redact_headers(tuple(headers.items(multi=True)), secret_names)))


def _encode(headers) -> list[tuple[bytes, bytes]]:
    return [(k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape")) for k, v in headers]


addons = [KeyCourier()]  # what mitmproxy loads from this file as a script
