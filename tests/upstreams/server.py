"""What every test server shares: a threaded HTTP(S) server on 127.0.0.1 run in a background thread,
TLS with a certificate from a trustme CA (each handshake in its connection's own thread), and the
handler plumbing for reading requests and writing responses."""

from __future__ import annotations

import re
import ssl
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import trustme

from tests.upstreams.common import ReceivedRequest, parse_query


def server_tls_context(ca: trustme.CA, *extra_hostnames: str) -> ssl.SSLContext:
    """A server context with a certificate from `ca` for 127.0.0.1, localhost and `extra_hostnames`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost", *extra_hostnames).configure_cert(context)
    return context


class TlsHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer on 127.0.0.1 serving `owner` (reached by handlers as `self.server.owner`),
    over TLS when given a context."""

    daemon_threads = True  # a client idling on a keep-alive connection must not hold up stop()

    def __init__(self, handler: type[BaseHTTPRequestHandler], ssl_context: ssl.SSLContext | None, *,
                 owner: object, port: int = 0):
        super().__init__(("127.0.0.1", port), handler)
        self.owner = owner
        if ssl_context is not None:
            # The handshake happens in the connection's own thread (see ResponseWriter.handle), so a
            # stalled client cannot block accept().
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True,
                                                  do_handshake_on_connect=False)


class TestServer:
    """A server started by start() or `with` and stopped by stop(), on a port the system picks once
    (a restart listens on the same one). Subclasses name their `handler` and `thread_name`, and
    `extra_hostnames` for the certificate."""

    __test__ = False  # not a pytest test class
    handler: type[BaseHTTPRequestHandler]
    thread_name = "test-server"
    extra_hostnames: tuple[str, ...] = ()
    missing_ca_message = "TLS needs a trustme.CA to issue the server certificate"

    def __init__(self, ca: trustme.CA | None, *, tls: bool = True, port: int = 0):
        if tls and ca is None:
            raise ValueError(self.missing_ca_message)
        self._ca = ca
        self.tls = tls
        self._port = port  # 0: the system picks one
        self._server: TlsHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _make_server(self, ssl_context: ssl.SSLContext | None, port: int) -> TlsHTTPServer:
        return TlsHTTPServer(self.handler, ssl_context, owner=self, port=port)

    def start(self):
        context = server_tls_context(self._ca, *self.extra_hostnames) if self.tls else None
        self._server = self._make_server(context, self._port)
        self._port = self._server.server_address[1]
        # A short poll interval keeps stop() quick.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"


class StorageUpstream(TestServer):
    """A storage service emulator: every request recorded in `requests`, the traceback of each one
    answered with 500 in `internal_errors`."""

    def __init__(self, ca: trustme.CA | None, *, tls: bool = True, port: int = 0):
        super().__init__(ca, tls=tls, port=port)
        self.requests: list[ReceivedRequest] = []
        self.internal_errors: list[str] = []  # tracebacks of requests answered with 500

    @property
    def endpoint_url(self) -> str:
        return self.base_url

    def clear_requests(self) -> None:
        self.requests.clear()


class ResponseWriter:
    """Handler mixin (before BaseHTTPRequestHandler): the TLS handshake, silence, and writing a
    response."""

    def handle(self):
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.do_handshake()
            except (ssl.SSLError, OSError):
                return  # e.g. a client that does not trust the CA: nothing to serve
        super().handle()

    def log_message(self, format, *args):
        pass  # silent: request lines can name secrets (Vault paths), and test output is no place for them

    def write_response(self, status: int, headers: Iterable[tuple[str, str]], body: bytes, *,
                       without_length: Iterable[int] = (204,)) -> None:
        """Status, headers, a Content-Length unless given or the status is in `without_length`, and
        the body unless the request is a HEAD."""
        headers = list(headers)
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if status not in without_length and not any(name.lower() == "content-length" for name, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class StorageHandler(ResponseWriter, BaseHTTPRequestHandler):
    """The storage upstreams' handler: each request recorded in the owner's `requests`, its body
    read at most once."""

    protocol_version = "HTTP/1.1"
    sys_version = ""
    timeout = 120
    _body_consumed = True

    def version_string(self):
        return self.server_version

    def receive(self) -> tuple[str, str, list[tuple[str, str]], ReceivedRequest]:
        """(raw path, raw query, decoded query, record) of the request, recorded in the owner's
        `requests`."""
        raw_path, _, raw_query = self.path.partition("?")
        query = parse_query(raw_query)
        record = ReceivedRequest(self.command, raw_path, query, list(self.headers.items()))
        self.server.owner.requests.append(record)
        self._body_consumed = False
        return raw_path, raw_query, query, record

    def body_left_unread(self) -> bool:
        """Whether the request declared a body that was never read."""
        return not self._body_consumed and (self.headers.get("Transfer-Encoding") is not None
                                            or self.headers.get("Content-Length", "0") != "0")

    def close_after_response(self, headers: list[tuple[str, str]]) -> None:
        """Close the connection after this response, saying so in `headers`."""
        self.close_connection = True
        headers.append(("Connection", "close"))

    def read_http_chunked(self, incomplete: Callable[[], Exception]) -> bytes:
        """Undo Transfer-Encoding: chunked, raising `incomplete()` for a truncated or malformed body;
        trailer fields are read and dropped."""
        pieces = []
        while True:
            size_text = self.rfile.readline(1024).split(b";")[0].strip()
            if not re.fullmatch(rb"[0-9a-fA-F]+", size_text):
                raise incomplete()
            size = int(size_text, 16)
            if size == 0:
                break
            pieces.append(self.rfile.read(size))
            if len(pieces[-1]) != size or self.rfile.read(2) != b"\r\n":
                raise incomplete()
        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
            pass
        return b"".join(pieces)
