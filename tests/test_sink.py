import http.client

import pytest

from keycourier.sink import TOKEN_HEADER, Answer, RefusalSink, framing_headers


@pytest.fixture
def sink():
    listener = RefusalSink()
    yield listener
    listener.close()


def send(sink, token, body_headers, body):
    connection = http.client.HTTPConnection(*sink.address, timeout=10)
    connection.putrequest("PUT", "/bucket/object")
    connection.putheader(TOKEN_HEADER, token)
    for name, value in body_headers.items():
        connection.putheader(name, value)
    connection.endheaders()
    for piece in body:
        connection.send(piece)
    response = connection.getresponse()
    return connection, response.status, dict(response.getheaders()), response.read()


def test_the_body_is_read_to_the_end_and_the_parked_refusal_answers(sink):
    token = sink.park(Answer(403, {"x-keycourier-error": "deny"}, b"<Error/>"))
    connection, status, headers, body = send(sink, token, {"content-length": str(3 * 65536)}, [bytes(65536)] * 3)
    assert (status, headers["x-keycourier-error"], body) == (403, "deny", b"<Error/>")
    # The whole body was consumed: the same connection carries the next request.
    second = sink.park(Answer(503, {}, b""))
    connection.putrequest("PUT", "/b/o")
    connection.putheader(TOKEN_HEADER, second)
    connection.putheader("content-length", "0")
    connection.endheaders()
    assert connection.getresponse().status == 503


def test_chunked_bodies_and_trailers_are_discarded(sink):
    token = sink.park(Answer(400, {}, b"bad"))
    chunks = [b"5;chunk-signature=x\r\nhello\r\n", b"0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n"]
    _, status, _, body = send(sink, token, {"transfer-encoding": "chunked"}, chunks)
    assert (status, body) == (400, b"bad")


def test_an_unknown_token_gets_no_parked_answer(sink):
    _, status, _, _ = send(sink, "forged", {"content-length": "0"}, [])
    assert status == 400


def test_only_framing_reaches_the_sink():
    headers = [("Authorization", "AWS4-HMAC-SHA256 ..."), ("x-amz-server-side-encryption-customer-key", "k"),
               ("Content-Length", "10"), ("Expect", "100-continue")]
    assert framing_headers(headers) == [("Content-Length", "10"), ("Expect", "100-continue")]
