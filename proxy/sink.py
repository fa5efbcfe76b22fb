"""Where refused uploads go. mitmproxy answers a request itself only after reading its whole body into
memory, so a refused multi-GiB upload would be held whole. Instead, a refused request with a body is
sent, stripped of every header but its framing, to this local listener: it reads the body to the end,
throws it away, and answers with the refusal. Memory stays flat and nothing reaches the upstream."""
from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN_HEADER = "x-keycourier-refusal"
PIECE = 64 * 1024


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class RefusalSink:
    def __init__(self):
        self._answers: dict[str, Answer] = {}
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"sink": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="keycourier-refusals", daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        return self._server.server_address[:2]

    def park(self, answer: Answer) -> str:
        """Keeps `answer` for the request that will bring back the returned token."""
        token = secrets.token_hex(16)
        with self._lock:
            self._answers[token] = answer
        return token

    def take(self, token: str | None) -> Answer:
        with self._lock:
            return self._answers.pop(token or "", Answer(400, {"content-type": "text/plain"}, b"unknown refusal\n"))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def framing_headers(headers) -> list[tuple[str, str]]:
    """Only what says where the body ends, and Expect (mitmproxy answers a client's 100-continue
    itself): the sink needs nothing else, and must see no key or credential."""
    return [(name, value) for name, value in headers
            if name.lower() in ("content-length", "transfer-encoding", "expect")]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no wait for a delayed ACK
    sink: RefusalSink

    def do_PUT(self):
        self._discard_body()
        answer = self.sink.take(self.headers.get(TOKEN_HEADER))
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    do_POST = do_PATCH = do_DELETE = do_GET = do_PUT

    def _discard_body(self):
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                self._skip(size + 2)
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return
        self._skip(int(self.headers.get("content-length") or 0))

    def _skip(self, remaining: int):
        while remaining > 0:
            read = len(self.rfile.read(min(remaining, PIECE)))
            if not read:
                return
            remaining -= read

    def log_message(self, *args):
        pass
