"""Streams a large object through the real keycourier process and prints throughput and its memory.

    .venv/bin/python benchmarks/stream_memory.py [--gib 2]

An encrypt rule covers the bucket, so each request is classified, given its key, re-signed and forwarded.
The upstream is a sink on 127.0.0.1 that discards uploads and serves downloads of the same size.
Last, the same upload to a denied bucket: keycourier refuses it without holding the body.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import requests
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (PIECE, SinkUpstream, Upload, memory_kib, policy, signed_headers,  # noqa: E402
                               write_key_and_credentials)
from tests.conftest import Keycourier  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=2.0)
    size = int(parser.parse_args().gib * 1024) * PIECE
    work = Path(tempfile.mkdtemp(prefix="kc-bench-"))
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    sink = SinkUpstream(ca, size).start()
    port = sink.port

    write_key_and_credentials(work)
    rules = ["{match: {provider: s3, bucket: bench}, action: encrypt, key: bench}", "{match: {provider: s3}, action: deny}"]
    (work / "conf").mkdir()
    proxy = Keycourier(work, work / "conf", policy(work, [port], rules), upstream_ca=work / "ca.pem", save_flows=False)
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would otherwise replace the CA given here
    session.proxies = {"https": proxy.url}
    session.verify = str(proxy.ca_cert)
    url = f"https://127.0.0.1:{port}/bench/object.bin"
    try:
        print(f"keycourier at start: RSS {memory_kib(proxy.process.pid)['VmRSS'] / 1024:.0f} MiB")

        start = time.monotonic()
        response = session.put(url, data=Upload(size), headers=signed_headers("PUT", url), timeout=600)
        upload_seconds = time.monotonic() - start
        assert response.status_code == 200, response.text
        print(f"PUT {size / 2**30:.1f} GiB: {size / upload_seconds / 2**20:.0f} MiB/s, "
              f"keycourier peak RSS {memory_kib(proxy.process.pid)['VmHWM'] / 1024:.0f} MiB")

        start = time.monotonic()
        received = 0
        with session.get(url, headers=signed_headers("GET", url), stream=True, timeout=600) as response:
            assert response.status_code == 200, response.text
            for piece in response.iter_content(PIECE):
                received += len(piece)
        assert received == size
        download_seconds = time.monotonic() - start
        print(f"GET {size / 2**30:.1f} GiB: {size / download_seconds / 2**20:.0f} MiB/s, "
              f"keycourier peak RSS {memory_kib(proxy.process.pid)['VmHWM'] / 1024:.0f} MiB")

        denied = f"https://127.0.0.1:{port}/denied/object.bin"
        start = time.monotonic()
        response = session.put(denied, data=Upload(size), headers=signed_headers("PUT", denied), timeout=600)
        assert response.status_code == 403, response.text
        print(f"refused PUT {size / 2**30:.1f} GiB (deny rule): answered 403 after {time.monotonic() - start:.1f} s, "
              f"keycourier peak RSS {memory_kib(proxy.process.pid)['VmHWM'] / 1024:.0f} MiB")
    finally:
        proxy.stop()
        sink.stop()
        shutil.rmtree(work)  # it holds the key


if __name__ == "__main__":
    main()
