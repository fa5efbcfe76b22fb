"""Key rotation, measured against the strict S3 test upstream on 127.0.0.1 with keys in the Vault-API test server:

- `keycourier rotate` throughput (objects/s) over many small objects written under the old key version;
- the latency of a read through keycourier when its object is under an older version (its first read: a
  fallback to the old version; its next reads: remembered) against a read of an object under the newest.

    .venv/bin/python benchmarks/rotation.py [--objects 1000] [--reads 200] [--concurrency 8]
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import os
import ssl
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import ACCESS_KEY, SECRET, NoDelayS3Upstream, signed_headers  # noqa: E402
from benchmarks.small_requests import Configuration  # noqa: E402
from keycourier.keys import Credential  # noqa: E402
from keycourier.policy import load_policy  # noqa: E402
from keycourier.rotate import S3Bucket, State, rotate  # noqa: E402
from tests.conftest import Keycourier  # noqa: E402
from tests.upstreams.vault import VaultServer  # noqa: E402

BUCKET = "bench-rot"
OLD, NEW = os.urandom(32), os.urandom(32)


def sse_c_headers(key: bytes) -> dict[str, str]:
    return {"x-amz-server-side-encryption-customer-algorithm": "AES256",
            "x-amz-server-side-encryption-customer-key": base64.b64encode(key).decode(),
            "x-amz-server-side-encryption-customer-key-md5": base64.b64encode(hashlib.md5(key).digest()).decode()}


def request(connection, method: str, url: str, body: bytes = b"", extra: dict | None = None) -> float:
    """One signed request; its latency in ms. The answer must be 200."""
    headers = signed_headers(method, url, extra)
    if method == "PUT":
        headers["Content-Length"] = str(len(body))
    started = time.perf_counter()
    connection.request(method, urlsplit(url).path, body=body or None, headers=headers)
    answer = connection.getresponse()
    answer.read()
    if answer.status != 200:
        raise RuntimeError(f"{method} {url}: {answer.status}")
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=1000, help="objects rotated")
    parser.add_argument("--reads", type=int, default=200, help="reads measured per kind")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    with ExitStack() as cleanup, tempfile.TemporaryDirectory(prefix="keycourier-bench-") as scratch:
        work, ca = Path(scratch), trustme.CA()
        upstream_ca = work / "upstream-ca.pem"
        ca.cert_pem.write_to_path(str(upstream_ca))
        s3 = cleanup.enter_context(NoDelayS3Upstream(ca, {ACCESS_KEY: SECRET}))
        s3.create_bucket(BUCKET)
        vault = cleanup.enter_context(VaultServer(ca))
        vault.kv_put("bench/rot", {"key": base64.b64encode(OLD).decode()})
        for name, text in (("vault-token", vault.root_token), ("app.yaml", f"access_key_id: {ACCESS_KEY}\nsecret_access_key: {SECRET}\n")):
            (work / name).write_text(text)
            (work / name).chmod(0o600)
        policy_text = f"""version: 1
vault: {{addr: "{vault.addr}", ca_cert: "{upstream_ca}", auth: {{method: token, token_file: {work}/vault-token}}}}
key_cache_ttl: 1
endpoints: [{{host: "127.0.0.1:{s3.port}", provider: s3}}]
keys: {{rot: {{vault: {{path: secret/data/bench/rot}}}}}}
credentials: {{app: {{file: {work}/app.yaml, access_key_id: {ACCESS_KEY}}}}}
rules: [{{match: {{provider: s3, bucket: {BUCKET}}}, action: encrypt, key: rot}}]
"""
        (work / "proxy").mkdir()
        proxy = Keycourier(work / "proxy", work / "confdir", policy_text, upstream_ca=upstream_ca, save_flows=False)
        cleanup.callback(proxy.stop)
        tls = ssl.create_default_context(cafile=upstream_ca)
        tls.load_verify_locations(proxy.ca_cert)
        direct, through = Configuration("direct", None, tls), Configuration("keycourier", proxy, tls)
        url = f"{s3.endpoint_url}/{BUCKET}"

        # Objects under the old version, written before keycourier knew them (straight to S3, with the key).
        def write(names):
            connection = direct.connect(url)
            for name in names:
                request(connection, "PUT", f"{url}/{name}", b"x" * 1024, sse_c_headers(OLD))
        names = [f"old-{n:05d}" for n in range(args.objects)]
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(write, [names[n::args.concurrency] for n in range(args.concurrency)]))
        vault.kv_put("bench/rot", {"key": base64.b64encode(NEW).decode()})
        time.sleep(1.2)  # keycourier's cache (key_cache_ttl 1) takes the new version

        reader = through.connect(url)
        newest = [f"new-{n:05d}" for n in range(args.reads)]
        for name in newest:
            request(reader, "PUT", f"{url}/{name}", b"y" * 1024)
        latency = {
            "newest version": [request(reader, "GET", f"{url}/{name}") for name in newest],
            "older version, first read (fallback)": [request(reader, "GET", f"{url}/{name}") for name in names[:args.reads]],
            "older version, next reads (remembered)": [request(reader, "GET", f"{url}/{name}") for name in names[:args.reads]],
        }
        print(f"read latency through keycourier, 1 KiB objects, {args.reads} reads each (median / p90 ms):")
        base = statistics.median(latency["newest version"])
        for kind, samples in latency.items():
            median = statistics.median(samples)
            p90 = statistics.quantiles(samples, n=10)[-1]
            print(f"  {kind:42s} {median:6.2f} / {p90:6.2f}   (+{median - base:5.2f} ms over newest)")

        policy = load_policy(work / "proxy" / "policies.yaml")
        store = S3Bucket(s3.endpoint_url, BUCKET, Credential("app", ACCESS_KEY, SECRET), "us-east-1", str(upstream_ca),
                         5 * 1024**3)
        started = time.perf_counter()
        summary = rotate(policy, store, provider="s3", bucket=BUCKET, account=None, prefix="old-", dry_run=False,
                         concurrency=args.concurrency, state=State(None), include_plaintext=False)
        seconds = time.perf_counter() - started
        print(f"keycourier rotate: {summary.rotated} objects rotated, {summary.current} already current, "
              f"{len(summary.failed)} failed in {seconds:.1f} s: {summary.examined / seconds:.0f} objects/s "
              f"(concurrency {args.concurrency}; a HEAD with the new key, a HEAD with the old, a CopyObject each)")


if __name__ == "__main__":
    main()
