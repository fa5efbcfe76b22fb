"""Where reads go whose object may be under an older key version: mitmproxy sends one request, and the
provider's answer to a wrong key cannot be taken back. Such a request is sent instead, stripped to a token,
to this local listener, which tries the prepared attempts against the provider in turn (each on its own
request over verified TLS, newest key first) and streams back the first answer that is not a wrong-key
answer, marked with which attempt it was. Only bodiless requests come here (reads, copies), so nothing is
buffered; tries are bounded by the attempts, and the last answer is the provider's own."""
from __future__ import annotations

import http.client
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from keycourier.listener import ListenerHandler, ParkingListener
from keycourier.message import Request

TOKEN_HEADER = "x-keycourier-fallback"
ATTEMPT_HEADER = "x-keycourier-attempt"  # which attempt answered; taken off before the client sees it
ERROR_START_BYTES = 64 * 1024  # provider error documents are far smaller
PIECE = 64 * 1024
TIMEOUT_SECONDS = 300
# Hop-by-hop headers (RFC 9110 7.6.1) and framing, which this listener sets itself.
_NOT_RELAYED = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                          "proxy-connection", "content-length"})

Judge = Callable[[int, dict[str, str], bytes], str]  # (status, headers, body start) -> wrong_key | plaintext | served


@dataclass(frozen=True)
class Parked:
    requests: Sequence[Request]  # in the order to try; a request without a key comes last, if at all
    plaintext_at: int | None  # the index of the request without a key
    judge: Judge


class FallbackForwarder(ParkingListener[Parked]):
    def __init__(self, tls: ssl.SSLContext):
        super().__init__(_Handler, "keycourier-fallback")
        self._tls = tls
        self._idle: dict[tuple[str, int], list[http.client.HTTPSConnection]] = {}  # kept-alive upstream connections

    def send(self, request: Request) -> tuple[http.client.HTTPSConnection, http.client.HTTPResponse]:
        """The request on a kept-alive connection to its upstream if one is idle (once more on a new one if that
        connection turns out closed), else on a new one."""
        with self._lock:
            idle = self._idle.get((request.host, request.port))
            connection = idle.pop() if idle else None
        if connection is not None:
            try:
                return connection, self._exchange(connection, request)
            except (OSError, http.client.HTTPException):
                connection.close()
        connection = http.client.HTTPSConnection(request.host, request.port, timeout=TIMEOUT_SECONDS, context=self._tls)
        return connection, self._exchange(connection, request)

    @staticmethod
    def _exchange(connection: http.client.HTTPSConnection, request: Request) -> http.client.HTTPResponse:
        connection.putrequest(request.method, request.target, skip_host=True, skip_accept_encoding=True)
        for name, value in request.headers:
            connection.putheader(name, value)
        connection.endheaders()
        return connection.getresponse()

    def done_with(self, connection: http.client.HTTPSConnection, response: http.client.HTTPResponse) -> None:
        """After its answer was read to the end: kept for the next request unless the upstream closes it."""
        if response.will_close or not response.isclosed():
            connection.close()
            return
        with self._lock:
            self._idle.setdefault((connection.host, connection.port), []).append(connection)


def next_attempt(parked: Parked, tried: int, outcome: str) -> int | None:
    """After attempt `tried` answered `outcome`, the attempt to try next, or None to pass the answer on."""
    if outcome == "plaintext":
        return parked.plaintext_at if parked.plaintext_at not in (None, tried) else None
    if outcome == "wrong_key":
        following = [n for n in range(tried + 1, len(parked.requests)) if n != parked.plaintext_at]
        return following[0] if following else None
    return None


class _Handler(ListenerHandler):
    listener: FallbackForwarder

    def _serve(self):
        parked = self.listener.take(self.headers.get(TOKEN_HEADER))
        if parked is None:
            self.answer(400, [("content-type", "text/plain")], b"unknown fallback token\n")
            return
        tried = 0
        while True:
            try:
                connection, response = self.listener.send(parked.requests[tried])
            except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
                self.answer(502, [("content-type", "text/plain"), ("x-keycourier-error", "the provider could not be "
                                  f"reached: {type(exc).__name__}")], b"")
                return
            headers = {name.lower(): value for name, value in response.getheaders()}
            start = response.read(ERROR_START_BYTES) if response.status >= 400 and self.command != "HEAD" else b""
            following = next_attempt(parked, tried, parked.judge(response.status, headers, start))
            if following is None:
                self._relay(response, tried, start)
            else:
                response.read()  # the rest of an error document: the connection serves the next try
            self.listener.done_with(connection, response)
            if following is None:
                return
            tried = following

    do_GET = do_HEAD = do_PUT = _serve

    def _relay(self, response: http.client.HTTPResponse, tried: int, start: bytes):
        headers = [(name, value) for name, value in response.getheaders() if name.lower() not in _NOT_RELAYED]
        length = response.getheader("content-length")
        self.send_response(response.status, response.reason)
        for name, value in [*headers, (ATTEMPT_HEADER, str(tried))]:
            self.send_header(name, value)
        if self.command == "HEAD" or response.status in (204, 304):
            if length is not None:
                self.send_header("content-length", length)
            self.end_headers()
            response.read()  # nothing to read, but http.client's connection is free for the next request only then
            return
        chunked = length is None
        if chunked:
            self.send_header("transfer-encoding", "chunked")
        else:
            self.send_header("content-length", length)
        self.end_headers()
        piece = start
        while True:
            if piece:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            piece = response.read(PIECE)
            if not piece:
                break
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
