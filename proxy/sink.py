"""Where refused uploads go. mitmproxy answers a request itself only after reading its whole body into
memory, so a refused multi-GiB upload would be held whole. Instead, a refused request with a body is
sent, stripped of every header but its framing, to this local listener: it reads the body to the end,
throws it away, and answers with the refusal. Memory stays flat and nothing reaches the upstream."""
from __future__ import annotations

from dataclasses import dataclass
from keycourier.listener import ListenerHandler, ParkingListener

TOKEN_HEADER = "x-keycourier-refusal"
PIECE = 64 * 1024


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


UNKNOWN = Answer(400, {"content-type": "text/plain"}, b"unknown refusal\n")


class RefusalSink(ParkingListener[Answer]):
    def __init__(self):
        super().__init__(_Handler, "keycourier-refusals")


def framing_headers(headers) -> list[tuple[str, str]]:
    """Only what says where the body ends, and Expect (mitmproxy answers a client's 100-continue
    itself): the sink needs nothing else, and must see no key or credential."""
    return [(name, value) for name, value in headers
            if name.lower() in ("content-length", "transfer-encoding", "expect")]


class _Handler(ListenerHandler):
    listener: RefusalSink

    def do_PUT(self):
        self._discard_body()
        refusal = self.listener.take(self.headers.get(TOKEN_HEADER)) or UNKNOWN
        self.answer(refusal.status, refusal.headers.items(), refusal.body)

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
