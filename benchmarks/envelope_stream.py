"""Streams a large object up and down through the real keycourier process under an OSS envelope rule
(`envelope: oss-cse`: keycourier encrypts and decrypts the body itself) and, beside it, the same transfer under
a plain OSS encrypt rule (`oss_sse: AES256`: OSS encrypts, the body passes untouched), and prints the
throughput and keycourier's peak RSS of each.

    .venv/bin/python benchmarks/envelope_stream.py [--mib 1024] [--runs 1]

The upstream is a sink on 127.0.0.1 that discards uploads and serves downloads of the same size with the last
upload's metadata, so GETs under the envelope rule are unwrapped and decrypted. Requests are signed with OSS
V1 by oss2's signer; keycourier verifies and re-signs them. Peak RSS is reset before each transfer.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import oss2
import requests
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (ACCESS_KEY, PIECE, SECRET, SinkUpstream, Upload, memory_kib,  # noqa: E402
                               reset_peak_memory, write_key_and_credentials)
from tests.conftest import Keycourier  # noqa: E402

RULES = {"envelope": ("bench-cse", "envelope: oss-cse, key: master"), "oss_sse": ("bench-sse", "oss_sse: AES256")}


def write_master_key(work: Path) -> None:
    key = rsa.generate_private_key(65537, 2048)
    (work / "master.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    (work / "master.pem").chmod(0o600)


def policy(work: Path, port: int) -> str:
    rules = "".join(f"  - {{match: {{provider: oss, bucket: {bucket}}}, action: encrypt, {rule}}}\n"
                    for bucket, rule in RULES.values())
    return f"""version: 1
endpoints: [{{host: "127.0.0.1:{port}", provider: oss}}]
keys: {{master: {{file: {work}/master.pem, type: rsa}}}}
credentials: {{app: {{file: {work}/app.yaml}}}}
rules:
{rules}"""


def signed_headers(method: str, url: str, bucket: str, key: str, size: int | None = None) -> dict[str, str]:
    """OSS V1 headers by oss2's own signer, as an oss2 application sends them."""
    headers = oss2.CaseInsensitiveDict({"date": oss2.utils.http_date()})
    if size is not None:
        headers["content-length"] = str(size)
    request = oss2.http.Request(method, url, headers=headers)
    oss2.Auth(ACCESS_KEY, SECRET)._sign_request(request, bucket, key)
    return {name: value for name, value in request.headers.items() if value is not None}


def transfer(session: requests.Session, proxy: Keycourier, method: str, url: str, bucket: str, size: int) -> tuple[float, float]:
    """(MiB/s, keycourier's peak RSS in MiB) of one streamed PUT or GET of `size` bytes."""
    reset_peak_memory(proxy.process.pid)
    start = time.monotonic()
    if method == "PUT":
        response = session.put(url, data=Upload(size), headers=signed_headers("PUT", url, bucket, "object.bin", size),
                               timeout=600)
        assert response.status_code == 200, response.text
    else:
        received = 0
        with session.get(url, headers=signed_headers("GET", url, bucket, "object.bin"), stream=True,
                         timeout=600) as response:
            assert response.status_code == 200, response.text
            for piece in response.iter_content(PIECE):
                received += len(piece)
        assert received == size
    seconds = time.monotonic() - start
    return size / seconds / 2**20, memory_kib(proxy.process.pid)["VmHWM"] / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    size = args.mib * PIECE
    work = Path(tempfile.mkdtemp(prefix="kc-bench-envelope-"))
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    sink = SinkUpstream(ca, size).start()
    write_key_and_credentials(work)
    write_master_key(work)
    (work / "conf").mkdir()
    proxy = Keycourier(work, work / "conf", policy(work, sink.port), upstream_ca=work / "ca.pem", save_flows=False)
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would otherwise replace the CA given here
    session.proxies = {"https": proxy.url}
    session.verify = str(proxy.ca_cert)
    try:
        print(f"keycourier at start: RSS {memory_kib(proxy.process.pid)['VmRSS'] / 1024:.0f} MiB; "
              f"{args.mib} MiB each way, {args.runs} run(s)")
        print(f"{'rule':<10} {'method':<6} {'MiB/s':>7} {'peak RSS MiB':>13}")
        for _ in range(args.runs):
            for name, (bucket, _) in RULES.items():
                url = f"https://127.0.0.1:{sink.port}/{bucket}/object.bin"
                for method in ("PUT", "GET"):
                    rate, peak = transfer(session, proxy, method, url, bucket, size)
                    print(f"{name:<10} {method:<6} {rate:>7.0f} {peak:>13.0f}", flush=True)
    finally:
        proxy.stop()
        sink.stop()
        shutil.rmtree(work)  # it holds the keys


if __name__ == "__main__":
    main()
