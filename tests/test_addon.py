"""The addon driven through mitmproxy's own test helpers: no network."""
import asyncio
import base64
from datetime import datetime, timezone

import pytest
from mitmproxy.test import taddons, tflow

from keycourier.addons.keycourier import KeyCourier
from keycourier.response import REDACTED
from tests.test_pipeline import signed


@pytest.fixture
def addon(tmp_path):
    (tmp_path / "k.key").write_text(base64.b64encode(bytes(32)).decode())
    (tmp_path / "k.key").chmod(0o600)
    (tmp_path / "app.yaml").write_text("access_key_id: AKIDEXAMPLE\nsecret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n")
    (tmp_path / "app.yaml").chmod(0o600)
    (tmp_path / "policies.yaml").write_text("""version: 1
endpoints: [{host: "127.0.0.1:9000", provider: s3}]
keys: {k: {file: k.key}}
credentials: {app: {file: app.yaml}}
rules:
  - {match: {provider: s3, bucket: "enc-*"}, action: encrypt, key: k}
  - {match: {provider: "*"}, action: deny}
""")
    keycourier = KeyCourier()
    with taddons.context(keycourier) as context:
        context.configure(keycourier, keycourier_policies=str(tmp_path / "policies.yaml"))
        assert not context.options.rawtcp  # an object store answering 101 must not turn into a raw relay
        yield keycourier


def signed_now(method, path):
    return signed(method, path, at=datetime.now(timezone.utc))


def flow_for(request):
    flow = tflow.tflow()
    flow.client_conn.timestamp_tls_setup = 1.0  # the client spoke TLS to keycourier
    flow.client_conn.sni = None  # as clients send for an IP address
    flow.request.scheme, flow.request.host, flow.request.port = request.scheme, request.host, request.port
    flow.request.method, flow.request.path = request.method, request.target
    flow.request.headers.clear()
    for name, value in request.headers:
        flow.request.headers.add(name, value)
    return flow


def test_deny_is_answered_without_forwarding(addon):
    flow = flow_for(signed_now("HEAD", "/other/a"))
    asyncio.run(addon.requestheaders(flow))
    assert flow.response.status_code == 403 and flow.response.content == b""
    assert "denies access to bucket other" in flow.response.headers["x-keycourier-error"]


def test_injected_key_is_streamed_and_redacted_once_sent(addon):
    flow = flow_for(signed_now("PUT", "/enc-a/x"))
    asyncio.run(addon.requestheaders(flow))
    assert flow.response is None and flow.request.stream
    assert flow.request.headers["x-amz-server-side-encryption-customer-key"] == base64.b64encode(bytes(32)).decode()
    assert "keycourier" not in flow.metadata  # mitmproxy saves metadata: decisions are kept elsewhere
    flow.response = tflow.tresp()
    addon.responseheaders(flow)
    assert flow.request.headers["x-amz-server-side-encryption-customer-key"] == REDACTED
    assert flow.response.stream


def test_a_failed_flow_is_redacted_too(addon):
    flow = flow_for(signed_now("PUT", "/enc-a/x"))
    asyncio.run(addon.requestheaders(flow))
    addon.error(flow)
    assert flow.request.headers["x-amz-server-side-encryption-customer-key"] == REDACTED
