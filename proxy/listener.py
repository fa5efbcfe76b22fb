"""A local listener keycourier sends a request to instead of its upstream (the refusal sink, the fallback
forwarder): what to do with it is parked here under a random token, which the request brings back as its only
header beside framing, so no key or credential crosses the loopback socket."""
from __future__ import annotations

import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class ListenerHandler(BaseHTTPRequestHandler):
    """What both listeners' request handlers share: keep-alive, no Nagle, no request log."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no wait for a delayed ACK

    def answer(self, status: int, headers: Iterable[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass  # request lines name objects


class ParkingListener(Generic[T]):
    def __init__(self, handler: type[ListenerHandler], name: str):
        self._parked: dict[str, T] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (handler,), {"listener": self}))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name=name, daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        return self._server.server_address[:2]

    def park(self, parked: T) -> str:
        """Keeps `parked` for the request that will bring back the returned token."""
        token = secrets.token_hex(16)
        with self._lock:
            self._parked[token] = parked
        return token

    def take(self, token: str | None) -> T | None:
        with self._lock:
            return self._parked.pop(token or "", None)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
