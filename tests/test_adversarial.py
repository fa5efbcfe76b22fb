"""keycourier driven as a hostile or merely unusual client would: raw sockets through CONNECT and TLS to the
real proxy process, every case judged at the upstream (what it stored, under which key) and not by
keycourier's own account. docs/security.md lists the classes of attack these cases stand for."""
from __future__ import annotations

import base64
import http.client
import os
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pytest

from keycourier.scrub import key_spellings
from tests.conftest import Keycourier
from tests.digests import md5_b64
from tests.test_pipeline import signed
from tests.upstreams.s3 import S3Upstream
from tests.upstreams.vault import VaultServer

ACCESS_KEY, SECRET = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
FILE_KEY, VAULT_KEY = os.urandom(32), os.urandom(32)
BUCKETS = ("enc-a", "deny-a", "public-a", "vault-a", "absent-a", "slow-a")
SLOW_VAULT_SECONDS = 1.5


@pytest.fixture(scope="module")
def s3(ca):
    with S3Upstream(ca, {ACCESS_KEY: SECRET}) as upstream:
        for bucket in BUCKETS:
            upstream.create_bucket(bucket)
        yield upstream


@pytest.fixture(scope="module")
def rotated(ca):
    """An endpoint named localhost whose credential was rotated at the provider but not in keycourier's store."""
    with S3Upstream(ca, {ACCESS_KEY: "rotated-at-the-provider"}) as upstream:
        upstream.create_bucket("enc-b")
        yield upstream


@pytest.fixture(scope="module")
def other(ca):
    """An S3-like service that is not an endpoint of the policy (until a reload makes it one)."""
    with S3Upstream(ca, {ACCESS_KEY: SECRET}) as upstream:
        upstream.create_bucket("enc-x")
        yield upstream


@pytest.fixture(scope="module")
def vault(ca):
    with VaultServer(ca) as server:
        for name in ("present", "slow"):
            server.kv_put(f"kc/{name}", {"key": base64.b64encode(VAULT_KEY).decode()})
        yield server


def policy_text(s3_port: int, rotated_port: int, vault: VaultServer, ca_pem, extra_endpoints: str = "") -> str:
    return f"""
version: 1
vault: {{addr: "{vault.addr}", ca_cert: "{ca_pem}", auth: {{method: token, token_file: vault-token}}}}
key_cache_failure_ttl: 30
endpoints:
  - {{host: "127.0.0.1:{s3_port}", provider: s3}}
  - {{host: "localhost:{rotated_port}", provider: s3}}{extra_endpoints}
keys:
  file: {{file: file.key}}
  vaulted: {{vault: {{path: secret/data/kc/present}}}}
  slow: {{vault: {{path: secret/data/kc/slow}}}}
  absent: {{vault: {{path: secret/data/kc/absent}}}}
credentials:
  broken: {{file: no-such-credentials.yaml}}
  app: {{file: app.yaml}}
rules:
  - {{match: {{provider: s3, bucket: "enc-*"}}, action: encrypt, key: file}}
  - {{match: {{provider: s3, bucket: "vault-*"}}, action: encrypt, key: vaulted}}
  - {{match: {{provider: s3, bucket: "slow-*"}}, action: encrypt, key: slow}}
  - {{match: {{provider: s3, bucket: "absent-*"}}, action: encrypt, key: absent}}
  - {{match: {{provider: s3, bucket: "deny-*"}}, action: deny}}
  - {{match: {{provider: "*"}}, action: passthrough}}
"""


def start_keycourier(workdir, confdir, ca_pem, vault, text) -> Keycourier:
    for name, content in (("file.key", base64.b64encode(FILE_KEY).decode()), ("vault-token", vault.root_token),
                          ("app.yaml", f"access_key_id: {ACCESS_KEY}\nsecret_access_key: {SECRET}\n")):
        (workdir / name).write_text(content)
        (workdir / name).chmod(0o600)
    return Keycourier(workdir, confdir, text, upstream_ca=ca_pem)


@pytest.fixture(scope="module")
def proxy(s3, rotated, vault, ca_pem, keycourier_confdir, tmp_path_factory):
    running = start_keycourier(tmp_path_factory.mktemp("adversarial"), keycourier_confdir, ca_pem, vault,
                               policy_text(s3.port, rotated.port, vault, ca_pem))
    yield running
    running.stop()


class Tunnel:
    """A raw client: CONNECT through keycourier to `host:port`, then TLS with `server_name` (None: no SNI), or
    plain bytes; every byte is the test's choice. Each send() is its own TLS record."""

    def __init__(self, proxy: Keycourier, host: str, port: int, *, server_name: str | None = None, tls: bool = True,
                 trust: tuple = ()):
        self.raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        self.raw.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        answer = http.client.HTTPResponse(self.raw, method="CONNECT")
        answer.begin()
        self.connect_status = answer.status
        self.connect_answer = answer.read().decode("latin-1") if answer.status != 200 else ""
        self.conn = self.raw
        if tls and self.connect_status == 200:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False  # names are what these tests play with; the chain is still verified
            for ca in (proxy.ca_cert, *trust):
                context.load_verify_locations(str(ca))
            self.conn = context.wrap_socket(self.raw, server_hostname=server_name)

    def issuer(self) -> str:
        return dict(x[0] for x in self.conn.getpeercert()["issuer"]).get("organizationName", "")

    def send(self, *pieces: bytes) -> Tunnel:
        for n, piece in enumerate(pieces):
            if n:
                time.sleep(0.05)  # so each piece arrives on its own, as a slow client's would
            self.conn.sendall(piece)
        return self

    def response(self, method: str = "PUT") -> tuple[int, dict[str, str], bytes]:
        answer = http.client.HTTPResponse(self.conn, method=method)
        answer.begin()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()

    def closed(self) -> bool:
        """Whether keycourier closed the connection (instead of answering)."""
        try:
            return self.conn.recv(1) == b""
        except (ConnectionError, ssl.SSLError, OSError):
            return True

    def close(self) -> None:
        self.conn.close()


def request_bytes(method: str, path: str, *, host: str, port: int, body: bytes = b"", headers=None) -> bytes:
    """A request signed by botocore as an SDK would sign it (for `host`), serialised byte for byte."""
    sent = signed(method, path, host=host, port=port, headers=headers, at=datetime.now(timezone.utc))
    lines = [f"{method} {sent.target} HTTP/1.1"]
    for name, value in sent.headers:
        lines.append(f"{name}: {value}")
    if body or method in ("PUT", "POST"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def stored(upstream: S3Upstream, bucket: str, key: str):
    try:
        return upstream.stored(bucket, key)
    except KeyError:
        return None


def received(upstream: S3Upstream, marker: str) -> list:
    return [r for r in list(upstream.requests) if marker in r.path]


# --- 1. the TCP stream: never relayed raw ----------------------------------------------------------

def test_a_request_line_split_across_tls_records_is_parsed_and_policed(proxy, s3):
    wire = request_bytes("PUT", "/enc-a/split-line", host="127.0.0.1", port=s3.port, body=b"plaintext?")
    tunnel = Tunnel(proxy, "127.0.0.1", s3.port)
    status, _, _ = tunnel.send(wire[:2], wire[2:9], wire[9:]).response()
    assert status == 200
    assert stored(s3, "enc-a", "split-line").sse_customer_key_md5 == md5_b64(FILE_KEY)


def test_a_split_request_to_a_deny_bucket_is_refused(proxy, s3):
    wire = request_bytes("PUT", "/deny-a/split-deny", host="127.0.0.1", port=s3.port, body=b"x")
    status, _, _ = Tunnel(proxy, "127.0.0.1", s3.port).send(wire[:1], wire[1:]).response()
    assert status == 403 and not received(s3, "split-deny")


def test_an_unusually_long_request_line_is_parsed_and_policed(proxy, s3):
    name = "long-" + "n" * 12_000
    wire = request_bytes("PUT", f"/enc-a/{name}", host="127.0.0.1", port=s3.port, body=b"long")
    status, _, _ = Tunnel(proxy, "127.0.0.1", s3.port).send(wire[:9000], wire[9000:]).response()
    assert status == 200 and stored(s3, "enc-a", name).sse_customer_key_md5 == md5_b64(FILE_KEY)


def test_bytes_that_are_not_http_are_closed_not_relayed(proxy, s3):
    tunnel = Tunnel(proxy, "127.0.0.1", s3.port)
    tunnel.send(b"\x00\x01not-http-" + os.urandom(64) + b" marker-not-http\r\n\r\n")
    answer = tunnel.conn.recv(4096)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400")
    assert not received(s3, "marker-not-http")


def test_plain_http_inside_a_tunnel_to_a_tls_endpoint_is_policed(proxy, s3):
    wire = request_bytes("PUT", "/enc-a/plain-in-tunnel", host="127.0.0.1", port=s3.port, body=b"x")
    status, headers, _ = Tunnel(proxy, "127.0.0.1", s3.port, tls=False).send(wire).response()
    assert status == 403 and "keys only travel over verified TLS" in headers["x-keycourier-error"]
    assert stored(s3, "enc-a", "plain-in-tunnel") is None


def test_a_connect_inside_a_tunnel_is_refused_and_the_connection_closed(proxy, s3):
    tunnel = Tunnel(proxy, "127.0.0.1", s3.port)
    tunnel.send(f"CONNECT 127.0.0.1:{s3.port} HTTP/1.1\r\nHost: 127.0.0.1:{s3.port}\r\n\r\n".encode())
    status, headers, _ = tunnel.response("CONNECT")
    assert status == 400 and headers["connection"] == "close" and tunnel.closed()
    assert not [r for r in s3.requests if r.method == "CONNECT"]


def test_a_protocol_upgrade_to_an_object_store_is_refused(proxy, s3):
    wire = request_bytes("GET", "/public-a/upgrade", host="127.0.0.1", port=s3.port,
                         headers={"Upgrade": "websocket", "Connection": "Upgrade"})
    status, headers, _ = Tunnel(proxy, "127.0.0.1", s3.port).send(wire).response("GET")
    assert status == 400 and "protocol upgrades" in headers["x-keycourier-error"] and not received(s3, "upgrade")


def test_conflicting_body_framing_cannot_smuggle_a_second_request(proxy, s3):
    smuggled = request_bytes("PUT", "/enc-a/smuggled", host="127.0.0.1", port=s3.port, body=b"plaintext")
    first = request_bytes("PUT", "/public-a/carrier", host="127.0.0.1", port=s3.port,
                          headers={"Transfer-Encoding": "chunked"})
    tunnel = Tunnel(proxy, "127.0.0.1", s3.port)
    tunnel.send(first.replace(b"Content-Length: 0\r\n", f"Content-Length: {len(smuggled) + 5}\r\n".encode())
                + b"0\r\n\r\n" + smuggled)
    try:
        tunnel.response()
        tunnel.response()
    except (http.client.HTTPException, OSError):
        pass
    smuggled_object = stored(s3, "enc-a", "smuggled")
    assert smuggled_object is None or smuggled_object.sse_customer_key_md5 == md5_b64(FILE_KEY)


# --- 2. every spelling of an endpoint ----------------------------------------------------------------

def policed_or_closed(proxy, spelling: str, port: int, wire: bytes, method: str = "PUT") -> int:
    """The status keycourier gave a request through a tunnel to `spelling`: refused at CONNECT, or answered."""
    tunnel = Tunnel(proxy, spelling, port)
    if tunnel.connect_status != 200:
        return tunnel.connect_status
    return tunnel.send(wire).response(method)[0]


@pytest.mark.parametrize("spelling", ["2130706433", "0x7f000001", "127.1", "0177.0.0.1", "127.0.0.1."])
def test_other_spellings_of_the_endpoints_address_are_policed_as_the_endpoint(proxy, s3, spelling):
    name = f"spelled-{spelling}"
    deny = request_bytes("PUT", f"/deny-a/{name}", host=spelling, port=s3.port, body=b"spelled")
    assert policed_or_closed(proxy, spelling, s3.port, deny) in (403, 502)
    encrypt = request_bytes("PUT", f"/enc-a/{name}", host=spelling, port=s3.port, body=b"spelled")
    policed_or_closed(proxy, spelling, s3.port, encrypt)
    # Whatever the answer (TLS to the upstream verifies its name, which these spellings are not), the
    # upstream never stores plaintext in the encrypt bucket nor anything in the deny bucket.
    assert stored(s3, "deny-a", name) is None
    assert stored(s3, "enc-a", name) is None or stored(s3, "enc-a", name).sse_customer_key_md5 == md5_b64(FILE_KEY)


@pytest.mark.parametrize("spelling", ["LOCALHOST", "localhost.", "LocalHost."])
def test_case_and_trailing_dot_name_the_same_endpoint(proxy, rotated, spelling):
    wire = request_bytes("GET", "/deny-b/x", host=spelling, port=rotated.port)
    assert policed_or_closed(proxy, spelling, rotated.port, wire, "GET") in (403, 502)
    assert not received(rotated, "deny-b")


def test_another_name_for_an_endpoints_address_is_closed(proxy, s3, rotated):
    seen = len(s3.requests), len(rotated.requests)
    # localhost:<s3 port> reaches the endpoint 127.0.0.1:<s3 port>, which the policy does not call localhost.
    tunnel = Tunnel(proxy, "localhost", s3.port)
    assert tunnel.connect_status == 502 and "under a name the policy does not give it" in tunnel.connect_answer
    # And the address of the endpoint named localhost, addressed as 127.0.0.1.
    assert Tunnel(proxy, "127.0.0.1", rotated.port).connect_status == 502
    assert (len(s3.requests), len(rotated.requests)) == seen


def test_a_tls_server_name_that_disagrees_with_the_tunnel_is_refused(proxy, s3):
    wire = request_bytes("PUT", "/public-a/sni-mismatch", host="127.0.0.1", port=s3.port, body=b"x")
    status, headers, _ = Tunnel(proxy, "127.0.0.1", s3.port, server_name="localhost").send(wire).response()
    assert status == 400 and "TLS server name" in headers["x-keycourier-error"]
    assert not received(s3, "sni-mismatch")


def test_a_host_header_naming_another_bucket_host_is_overridden_by_the_tunnels(proxy, s3):
    # Signed for a virtual-hosted name of the passthrough bucket, sent down a tunnel to the endpoint.
    wire = request_bytes("PUT", "/enc-a/host-header", host="public-a.s3.amazonaws.com", port=s3.port, body=b"x")
    status, _, _ = Tunnel(proxy, "127.0.0.1", s3.port).send(wire).response()
    assert status == 200 and stored(s3, "enc-a", "host-header").sse_customer_key_md5 == md5_b64(FILE_KEY)
    assert received(s3, "host-header")[-1].header("host") == f"127.0.0.1:{s3.port}"


def test_a_duplicate_host_header_is_refused(proxy, s3):
    wire = request_bytes("GET", "/public-a/two-hosts", host="127.0.0.1", port=s3.port)
    wire = wire.replace(b"\r\n\r\n", b"\r\nHost: enc-a.example\r\n\r\n", 1)
    status, _, _ = Tunnel(proxy, "127.0.0.1", s3.port).send(wire).response("GET")
    assert status == 400 and not received(s3, "two-hosts")


# --- 3. tunnels opened before a reload ----------------------------------------------------------------

def test_a_tunnel_opened_before_a_reload_is_closed_once_its_host_becomes_an_endpoint(
        s3, rotated, other, vault, ca, ca_pem, keycourier_confdir, tmp_path):
    running = start_keycourier(tmp_path, keycourier_confdir, ca_pem, vault,
                               policy_text(s3.port, rotated.port, vault, ca_pem))
    try:
        upstream_ca = tmp_path / "upstream-ca.pem"
        ca.cert_pem.write_to_path(str(upstream_ca))
        tunnel = Tunnel(running, "127.0.0.1", other.port, trust=(upstream_ca,))
        assert tunnel.issuer() != "mitmproxy"  # not an endpoint: relayed untouched, end to end with the service
        before = request_bytes("PUT", "/enc-x/before-reload", host="127.0.0.1", port=other.port, body=b"fine")
        assert tunnel.send(before).response()[0] == 200
        running.policy_path.write_text(policy_text(s3.port, rotated.port, vault, ca_pem,
                                                   f'\n  - {{host: "127.0.0.1:{other.port}", provider: s3}}'))
        running.wait_for_log("in force:", occurrences=2)
        after = request_bytes("PUT", "/enc-x/after-reload", host="127.0.0.1", port=other.port, body=b"secret")
        try:
            tunnel.send(after)
        except OSError:
            pass
        assert tunnel.closed()
        assert stored(other, "enc-x", "after-reload") is None
    finally:
        running.stop()


# --- 4. paths the provider may read differently ---------------------------------------------------------

@pytest.mark.parametrize("path", [
    "//enc-a/double-slash", "/enc-a//empty-segment", "/public-a/../enc-a/dot-dot", "/public-a/./dot",
    "/public-a/%2e%2e/enc-a/encoded-dots", "/public-a/x%2F..%2F..%2Fenc-a%2Fencoded-slash", "/enc%2Da/encoded-bucket",
    "/public-a/back%5Cslash", "/public-a/ctrl%0Achar",
])
def test_paths_servers_read_differently_are_refused(proxy, s3, path):
    marker = path.rsplit("/", 1)[-1]
    wire = request_bytes("PUT", path, host="127.0.0.1", port=s3.port, body=b"plaintext")
    status, _, _ = Tunnel(proxy, "127.0.0.1", s3.port).send(wire).response()
    assert status == 400
    assert not received(s3, marker.split("%")[0])


# --- 5. no key comes back -------------------------------------------------------------------------------

def test_a_provider_error_quoting_the_canonical_request_does_not_return_the_key(proxy, rotated):
    wire = request_bytes("PUT", "/enc-b/echo", host="localhost", port=rotated.port, body=b"x")
    status, headers, body = Tunnel(proxy, "localhost", rotated.port).send(wire).response()
    assert status == 403 and b"SignatureDoesNotMatch" in body and b"CanonicalRequest" in body
    assert b"x-amz-server-side-encryption-customer-key:" in body  # the provider did quote the header...
    for spelling in key_spellings(FILE_KEY):
        assert spelling not in body and spelling.decode("latin-1") not in str(headers)  # ...but not the key
    proxy.wait_for_log("op=PutObject", occurrences=1)
    saved = proxy.flows_path.read_bytes()
    assert not any(spelling in saved for spelling in key_spellings(FILE_KEY))


# --- 6. logs --------------------------------------------------------------------------------------------

def test_protocol_errors_log_no_object_name_or_body_byte(proxy, s3):
    withheld = proxy.log().count("[details withheld by keycourier]")
    for wire in (b"PUT /enc-a/object-name-secret HTTP/1.1\r\nBad Header Line\r\n\r\n",
                 b"PUT /enc-a/other-name-secret HTTP/1.1\r\nHost: x\r\nContent-Len",
                 b"GET /public-a/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nbody-bytes-secret"):
        tunnel = Tunnel(proxy, "127.0.0.1", s3.port)
        tunnel.send(wire)
        time.sleep(0.2)
        tunnel.close()
    # mitmproxy reports each error (a bad header line, a request cut short twice), without the bytes.
    proxy.wait_for_log("[details withheld by keycourier]", occurrences=withheld + 3)
    log = proxy.log()
    assert "object-name-secret" not in log and "other-name-secret" not in log and "body-bytes-secret" not in log


# --- 7. one slow or failing dependency ----------------------------------------------------------------

def timed_put(proxy, s3, bucket: str, name: str) -> tuple[int, float]:
    started = time.monotonic()
    wire = request_bytes("PUT", f"/{bucket}/{name}", host="127.0.0.1", port=s3.port, body=b"x")
    status = Tunnel(proxy, "127.0.0.1", s3.port).send(wire).response()[0]
    return status, time.monotonic() - started


def test_a_slow_vault_delays_only_the_requests_that_need_its_key(proxy, s3, vault):
    assert timed_put(proxy, s3, "vault-a", "warm")[0] == 200  # Vault login done, the vaulted key cached
    vault.latency = SLOW_VAULT_SECONDS
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            slow = pool.submit(timed_put, proxy, s3, "slow-a", "needs-the-slow-key")
            time.sleep(0.2)
            unrelated = [pool.submit(timed_put, proxy, s3, bucket, f"unrelated-{n}")
                         for n, bucket in enumerate(["public-a", "enc-a", "vault-a"] * 2)]
            for answer in unrelated:
                status, seconds = answer.result()
                assert status == 200 and seconds < SLOW_VAULT_SECONDS / 2
            status, seconds = slow.result()
            assert status == 200 and seconds >= SLOW_VAULT_SECONDS
    finally:
        vault.latency = 0.0


def test_concurrent_misses_of_a_key_vault_lacks_make_one_read_and_share_the_failure(proxy, s3, vault):
    timed_put(proxy, s3, "vault-a", "warm")
    reads_before = vault.count("GET", "/v1/secret/data/kc/absent")
    vault.latency = SLOW_VAULT_SECONDS
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda n: timed_put(proxy, s3, "absent-a", f"miss-{n}"), range(8)))
        elapsed = time.monotonic() - started
    finally:
        vault.latency = 0.0
    assert [status for status, _ in answers] == [503] * 8
    assert vault.count("GET", "/v1/secret/data/kc/absent") - reads_before == 1
    assert elapsed < 2 * SLOW_VAULT_SECONDS + 1  # not eight reads one after another


def test_an_unreadable_credential_listed_first_fails_no_request_signed_with_another(proxy, s3):
    status, _ = timed_put(proxy, s3, "enc-a", "broken-credential-first")
    assert status == 200 and stored(s3, "enc-a", "broken-credential-first").sse_customer_key_md5 == md5_b64(FILE_KEY)


# --- 8. odd methods and huge requests ---------------------------------------------------------------------

@pytest.mark.parametrize("method, bucket", [("PROPFIND", "enc-a"), ("LOCK", "deny-a"), ("OPTIONS", "enc-a"),
                                            ("PATCH", "enc-a"), ("BREW", "deny-a")])
def test_methods_keycourier_does_not_police_are_refused_under_encrypt_and_deny(proxy, s3, method, bucket):
    marker = f"odd-{method.lower()}"
    wire = request_bytes(method, f"/{bucket}/{marker}", host="127.0.0.1", port=s3.port, body=b"a body" * 100)
    status, headers, _ = Tunnel(proxy, "127.0.0.1", s3.port).send(wire).response(method)
    assert status == 403 and "x-keycourier-error" in headers and not received(s3, marker)


@pytest.mark.parametrize("shape", ["many headers", "huge header", "long target"])
def test_oversized_requests_get_a_clear_4xx_and_are_not_forwarded(proxy, s3, shape):
    headers, path = {}, "/public-a/oversized"
    if shape == "many headers":
        headers = {f"x-amz-meta-h{n}": "v" for n in range(300)}
    elif shape == "huge header":
        headers = {"x-amz-meta-big": "v" * 1_000_000}
    else:
        path += "-" + "t" * 20_000
    wire = request_bytes("PUT", path, host="127.0.0.1", port=s3.port, body=b"x", headers=headers)
    status, headers_back, _ = Tunnel(proxy, "127.0.0.1", s3.port).send(wire).response()
    assert status in (400, 414) and "x-keycourier-error" in headers_back and not received(s3, "oversized")


def test_the_proxy_still_serves_after_the_attacks(proxy, s3):
    wire = request_bytes("PUT", "/enc-a/after-everything", host="127.0.0.1", port=s3.port, body=b"ok")
    assert Tunnel(proxy, "127.0.0.1", s3.port).send(wire).response()[0] == 200
    assert proxy.process.poll() is None
