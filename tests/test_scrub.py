"""No key comes back: scrubbing provider answers of the keys a request carried, in every spelling."""
import base64
import os
import re
from urllib.parse import quote

import pytest

from keycourier.scrub import REDACTED, KeyScrubber, key_spellings, keys_in

KEY = bytes(range(200, 232))  # its base64 has '/' and '+', so the escaped spellings differ


def spellings_in(data: bytes) -> list[bytes]:
    return [s for s in key_spellings(KEY) if s in data]


@pytest.mark.parametrize("echo", [
    base64.b64encode(KEY), base64.b64encode(KEY).rstrip(b"="), base64.urlsafe_b64encode(KEY),
    quote(base64.b64encode(KEY).decode(), safe="").encode(), re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), quote(base64.b64encode(KEY).decode(), safe="")).encode(),
    base64.b64encode(KEY).replace(b"/", b"\\/"), KEY.hex().encode(), KEY.hex().upper().encode(), KEY,
])
def test_every_spelling_is_scrubbed_and_the_length_kept(echo):
    document = b"<CanonicalRequest>x-amz-server-side-encryption-customer-key:" + echo + b"\n</CanonicalRequest>"
    scrubbed = KeyScrubber([KEY]).scrub(document)
    assert echo in document and spellings_in(document)
    assert not spellings_in(scrubbed) and len(scrubbed) == len(document)
    assert REDACTED.encode()[:10] in scrubbed


def test_a_spelling_split_between_chunks_is_scrubbed_and_nothing_is_lost():
    body = os.urandom(3000) + base64.b64encode(KEY) + os.urandom(3000)
    for cut in (1, 2999, 3010, 3043, 3044):
        stream = KeyScrubber([KEY]).stream()
        out = stream(body[:cut]) + stream(body[cut:]) + stream(b"")
        assert len(out) == len(body) and not spellings_in(out)
        assert out[:2990] == body[:2990] and out[-2990:] == body[-2990:]


def test_bytes_pass_unchanged_when_they_hold_no_key():
    body = os.urandom(100_000)
    stream = KeyScrubber([KEY]).stream()
    assert b"".join(stream(body[i:i + 777]) for i in range(0, len(body), 777)) + stream(b"") == body


def test_headers_holding_a_key_are_redacted():
    headers = KeyScrubber([KEY]).headers([("x-echo", "k=" + base64.b64encode(KEY).decode()), ("etag", '"abc"')])
    assert headers == [("x-echo", REDACTED), ("etag", '"abc"')]


def test_keys_are_read_from_the_key_headers_a_request_carries():
    headers = [("x-amz-server-side-encryption-customer-key", base64.b64encode(KEY).decode()),
               ("x-ms-encryption-key", "not base64!"), ("authorization", "AWS4 ...")]
    assert keys_in(headers, ["x-amz-server-side-encryption-customer-key", "x-ms-encryption-key"]) == [KEY, b"not base64!"]
    assert not KeyScrubber(keys_in(headers, ["x-amz-copy-source-server-side-encryption-customer-key"]))
