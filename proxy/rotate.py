"""`keycourier rotate`: every object of a bucket moved onto the newest version of its rule's key (and, with
--include-plaintext, every object stored without one), in place, by server-side copy: object bytes never
pass through keycourier, no object is ever unreadable or plaintext (a copy onto itself replaces it at once),
nothing is deleted. Resumable with --state; --dry-run changes nothing. Keys never appear on the command line,
in the output or in the report (object names do: they are the user's own data, in the user's own file)."""
from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import ssl
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from keycourier.keys import Credential, Key, KeyUnavailable, Secrets, blocking
from keycourier.message import Request
from keycourier.policy import Policy, Rule
from keycourier.signers import azure as azure_signer
from keycourier.tls import upstream_context

DEFAULT_MULTIPART_THRESHOLD = 5 * 1024**3  # S3's largest single CopyObject
MIN_PART = 5 * 1024**2  # S3's smallest part but the last
MAX_PARTS = 10_000
AZURE_VERSION = "2026-02-06"  # the first that takes x-ms-source-encryption-* on Put Blob From URL
PROGRESS_EVERY = 100  # objects between progress lines when the output is not a terminal


class RotateError(Exception):
    """A reason that stops the whole run (a bucket without an encrypt rule, a key that cannot be had)."""


class ObjectFailed(Exception):
    """A reason that fails one object; the run goes on."""


@dataclass(frozen=True)
class Found:
    name: str
    size: int
    key_sha256: str | None = None  # what a listing says of the object's customer key ("": none), where it says


@dataclass
class Summary:
    examined: int = 0  # this run, not counting objects done in an earlier one
    current: int = 0
    rotated: int = 0
    migrated: int = 0  # from plaintext
    plaintext_left: int = 0  # plaintext objects left alone (no --include-plaintext)
    skipped: int = 0  # done in an earlier run (--state)
    failed: dict[str, str] = field(default_factory=dict)  # object name: reason
    bytes: int = 0
    changes: list[dict] = field(default_factory=list)  # what --dry-run would do / what was done

    def count(self, outcome: str) -> None:
        name = {"plaintext": "plaintext_left", "migrated": "migrated", "rotated": "rotated", "current": "current",
                "skipped": "skipped"}[outcome]
        setattr(self, name, getattr(self, name) + 1)

    def as_dict(self) -> dict:
        return {"examined": self.examined, "already_current": self.current, "rotated": self.rotated,
                "migrated_from_plaintext": self.migrated, "plaintext_left": self.plaintext_left,
                "skipped_from_state": self.skipped, "failed": len(self.failed), "bytes": self.bytes,
                "failures": self.failed, "changes": self.changes}


class S3Bucket:
    """S3 through botocore: HeadObject to learn an object's key, CopyObject (or a multipart copy) onto itself."""

    def __init__(self, endpoint: str, bucket: str, credential: Credential, region: str, verify: str | bool,
                 multipart_threshold: int):
        import botocore.session
        from botocore.config import Config

        self.bucket, self.threshold = bucket, multipart_threshold
        self.client = botocore.session.get_session().create_client(
            "s3", endpoint_url=endpoint, region_name=region, verify=verify,
            aws_access_key_id=credential.access_key_id, aws_secret_access_key=credential.secret_access_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}, proxies={}))

    def list(self, prefix: str) -> Iterator[Found]:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                yield Found(item["Key"], item["Size"])

    def key_of(self, found: Found, keys: tuple[Key, ...]) -> Key | None:
        """The version the object is under (None: no customer key); ObjectFailed if no version reads it."""
        from botocore.exceptions import ClientError

        for key in keys:
            try:
                self.client.head_object(Bucket=self.bucket, Key=found.name, **_sse_c(key))
                return key
            except ClientError as exc:
                status = exc.response["ResponseMetadata"]["HTTPStatusCode"]
                if status == 400:
                    return None  # SSE-C headers on an object stored without them
                if status != 403:
                    raise ObjectFailed(f"HeadObject answered {status}") from None
        raise ObjectFailed("no readable version of the key opens it (or access is denied)")

    def rewrite(self, found: Found, old: Key | None, new: Key) -> None:
        from botocore.exceptions import ClientError

        source = {"Bucket": self.bucket, "Key": found.name}
        try:
            if found.size <= self.threshold:
                self.client.copy_object(Bucket=self.bucket, Key=found.name, CopySource=source, MetadataDirective="COPY",
                                        **_sse_c(new), **_sse_c(old, "CopySource"))
            else:
                self._multipart_copy(found, source, old, new)
        except ClientError as exc:
            status, code = exc.response["ResponseMetadata"]["HTTPStatusCode"], exc.response["Error"].get("Code")
            hint = (": buckets created since April 2026 block SSE-C writes by default; allow SSE-C in the bucket's "
                    "default encryption configuration" if status == 403 else "")
            raise ObjectFailed(f"S3 refused the copy ({status} {code}){hint}") from None

    def _multipart_copy(self, found: Found, source: dict, old: Key | None, new: Key) -> None:
        head = self.client.head_object(Bucket=self.bucket, Key=found.name, **_sse_c(old))
        kept = {name: head[name] for name in ("ContentType", "ContentEncoding", "ContentLanguage", "ContentDisposition",
                                              "CacheControl", "Expires", "StorageClass") if name in head}
        tags = self.client.get_object_tagging(Bucket=self.bucket, Key=found.name).get("TagSet", [])
        if tags:
            kept["Tagging"] = "&".join(f"{quote(t['Key'], safe='')}={quote(t['Value'], safe='')}" for t in tags)
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=found.name, Metadata=head.get("Metadata", {}),
                                                     **kept, **_sse_c(new))["UploadId"]
        part = max(MIN_PART, min(self.threshold, 1024**3), -(-found.size // MAX_PARTS))
        try:
            parts = []
            for number, first in enumerate(range(0, found.size, part), 1):
                last = min(first + part, found.size) - 1
                answer = self.client.upload_part_copy(
                    Bucket=self.bucket, Key=found.name, UploadId=upload, PartNumber=number, CopySource=source,
                    CopySourceRange=f"bytes={first}-{last}", **_sse_c(new), **_sse_c(old, "CopySource"))
                parts.append({"PartNumber": number, "ETag": answer["CopyPartResult"]["ETag"]})
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=found.name, UploadId=upload,
                                                  MultipartUpload={"Parts": parts}, **_sse_c(new))
        except BaseException:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=found.name, UploadId=upload)
            raise


def _sse_c(key: Key | None, prefix: str = "") -> dict:
    return {} if key is None else {f"{prefix}SSECustomerAlgorithm": "AES256", f"{prefix}SSECustomerKey": key.material}


class AzureContainer:
    """Azure Blob through its REST API, signed with Shared Key: List Blobs tells each blob's key by its SHA-256,
    Put Blob From URL onto itself re-encrypts it (the source read with x-ms-source-encryption-*, under a
    short-lived SAS for the blob itself)."""

    def __init__(self, endpoint: str, account: str, container: str, credential: Credential, tls: ssl.SSLContext):
        url = urlsplit(endpoint)
        self.host, self.port, self.base = url.hostname, url.port or 443, url.path.rstrip("/")
        self.account, self.container, self.key, self.tls = account, container, credential.secret_access_key, tls
        self.local = threading.local()

    def list(self, prefix: str) -> Iterator[Found]:
        marker = ""
        while True:
            query = "restype=container&comp=list" + (f"&prefix={quote(prefix, safe='')}" if prefix else "") + (
                f"&marker={quote(marker, safe='')}" if marker else "")
            status, _, body = self._call("GET", f"/{self.container}", query)
            if status != 200:
                raise RotateError(f"List Blobs answered {status}")
            root = ET.fromstring(body)
            for blob in root.iter("Blob"):
                properties = blob.find("Properties")
                yield Found(blob.findtext("Name"), int(properties.findtext("Content-Length") or 0),
                            properties.findtext("CustomerProvidedKeySha256") or "")
            marker = root.findtext("NextMarker") or ""
            if not marker:
                return

    def key_of(self, found: Found, keys: tuple[Key, ...]) -> Key | None:
        """List Blobs names each blob's key by its SHA-256: no request needed."""
        if not found.key_sha256:
            return None
        for key in keys:
            if key.sha256_b64 == found.key_sha256:
                return key
        raise ObjectFailed("its customer key is none of the key's readable versions")

    def rewrite(self, found: Found, old: Key | None, new: Key) -> None:
        status, properties, _ = self._call("HEAD", self._path(found.name), "", _cpk(old))
        if status != 200:
            raise ObjectFailed(f"Get Blob Properties answered {status}")
        if properties.get("x-ms-blob-type") != "BlockBlob":
            raise ObjectFailed(f"only block blobs can be rotated by Put Blob From URL ({properties.get('x-ms-blob-type')})")
        kept = [(name, value) for name, value in properties.items() if name.startswith("x-ms-meta-")]
        kept += [(f"x-ms-blob-{name}", properties[name]) for name in ("content-type", "content-encoding", "content-language",
                                                                      "content-disposition", "cache-control") if name in properties]
        source = (f"https://{self.host}:{self.port}{self.base}{self._path(found.name)}?"
                  + azure_signer.blob_sas(self.account, self.key, self.container, found.name, "r",
                                          dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)))
        headers = [("x-ms-blob-type", "BlockBlob"), ("x-ms-copy-source", source), *kept, *_cpk(new),
                   *_cpk(old, "x-ms-source-encryption-")]
        status, answered, _ = self._call("PUT", self._path(found.name), "", headers)
        if status != 201:
            raise ObjectFailed(f"Put Blob From URL answered {status} {answered.get('x-ms-error-code', '')}")

    def _path(self, name: str) -> str:
        return f"/{self.container}/{quote(name, safe='/~')}"

    def _call(self, method: str, path: str, query: str, headers=()) -> tuple[int, dict[str, str], bytes]:
        try:
            return self._send(method, path, query, headers)
        except (http.client.HTTPException, OSError):
            self.local.connection = None  # a keep-alive connection the service closed: once more on a new one
            return self._send(method, path, query, headers)

    def _send(self, method: str, path: str, query: str, headers) -> tuple[int, dict[str, str], bytes]:
        target = self.base + path + (f"?{query}" if query else "")
        request = Request(method, "https", self.host, self.port, target, (
            ("host", f"{self.host}:{self.port}"), ("x-ms-version", AZURE_VERSION),
            ("x-ms-date", dt.datetime.now(dt.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")), *headers,
            *((("content-length", "0"),) if method == "PUT" else ())))
        authorization = azure_signer.shared_key_signature(self.key, azure_signer.string_to_sign(request, self.account))
        connection = self._connection()
        connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in (*request.headers, ("authorization", f"SharedKey {self.account}:{authorization}")):
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body

    def _connection(self) -> http.client.HTTPSConnection:
        if getattr(self.local, "connection", None) is None:
            self.local.connection = http.client.HTTPSConnection(self.host, self.port, context=self.tls, timeout=300)
        return self.local.connection


def _cpk(key: Key | None, prefix: str = "x-ms-encryption-") -> list[tuple[str, str]]:
    if key is None:
        return []
    return [(prefix + "key", key.b64), (prefix + "key-sha256", key.sha256_b64), (prefix + "algorithm", "AES256")]


class State:
    """Objects finished in earlier runs: one name per line (JSON string), appended as each finishes."""

    def __init__(self, path: Path | None):
        self.path, self._lock = path, threading.Lock()
        self.done: set[str] = set()
        if path and path.exists():
            self.done = {json.loads(line) for line in path.read_text().splitlines() if line.strip()}
        self._file = open(path, "a", encoding="utf-8") if path else None

    def finished(self, name: str) -> None:
        if self._file:
            with self._lock:
                self._file.write(json.dumps(name) + "\n")
                self._file.flush()
                os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file:
            self._file.close()


class Progress:
    """A bar on a terminal (objects, bytes, rate, ETA); a plain line every PROGRESS_EVERY objects otherwise."""

    def __init__(self, out=sys.stderr):
        self.out, self.started, self.tty = out, time.monotonic(), out.isatty()
        self.total: int | None = None

    def show(self, summary: Summary, force: bool = False) -> None:
        done = summary.examined
        if not (force or self.tty or done % PROGRESS_EVERY == 0):
            return
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = done / elapsed
        eta = f", ETA {((self.total - done) / rate):.0f}s" if self.total and rate else ""
        text = (f"{done}{'/' + str(self.total) if self.total else ''} objects, {summary.bytes / 1024**2:.1f} MiB, "
                f"{rate:.1f} objects/s{eta}; {summary.rotated} rotated, {summary.migrated} migrated, "
                f"{len(summary.failed)} failed")
        print(("\r" if self.tty else "") + text, end="" if self.tty and not force else "\n", file=self.out, flush=True)


def rotate(policy: Policy, store, *, provider: str, bucket: str, account: str | None, prefix: str, dry_run: bool,
           concurrency: int, state: State, include_plaintext: bool, progress: Progress | None = None,
           secrets: Secrets | None = None) -> Summary:
    rule = _encrypt_rule(policy, provider, bucket, account, prefix)
    secrets = secrets or Secrets()
    try:
        keys = blocking(lambda: secrets.read_keys(policy, policy.keys[rule.key]))
    except KeyUnavailable as exc:
        raise RotateError(f"cannot get key {rule.key!r}: {exc}") from None
    newest = keys[0]
    wait_for_proxies(newest, policy.key_cache_ttl, progress)
    summary, lock = Summary(), threading.Lock()

    def handle(found: Found) -> None:
        if found.name in state.done:
            outcome = "skipped"
        elif policy.rule_for(provider, bucket, found.name, account) != rule:
            outcome = None  # another rule (another prefix) covers it: not this run's to change
        else:
            outcome = _rotate_one(store, found, keys, newest, dry_run, include_plaintext)
        with lock:
            if outcome is None:
                return
            summary.examined += outcome != "skipped"
            if outcome in ("rotated", "migrated"):
                summary.bytes += found.size
                summary.changes.append({"object": found.name, "change": outcome})
            if outcome.startswith("failed:"):
                summary.failed[found.name] = outcome.removeprefix("failed:")
            else:
                summary.count(outcome)
            if progress:
                progress.show(summary)
        if outcome in ("current", "rotated", "migrated") and not dry_run:
            state.finished(found.name)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(handle, store.list(prefix)))
    if progress:
        progress.show(summary, force=True)
    return summary


def wait_for_proxies(newest: Key, cache_ttl: float, progress: Progress | None) -> None:
    """Running keycourier proxies read a new key version within key_cache_ttl of its writing; an object moved
    onto it before then would be under a version they do not know yet. So the rotation starts after that."""
    if newest.created is None:
        return
    wait = (newest.created - dt.datetime.now(dt.UTC)).total_seconds() + cache_ttl
    if wait > 0:
        if progress:
            print(f"waiting {wait:.0f}s until every keycourier has loaded key version {newest.version} "
                  f"(key_cache_ttl {cache_ttl:.0f}s)", file=progress.out, flush=True)
        time.sleep(wait)


def _rotate_one(store, found: Found, keys: tuple[Key, ...], newest: Key, dry_run: bool, include_plaintext: bool) -> str:
    try:
        under = store.key_of(found, keys)
        if under == newest:
            return "current"
        if under is None and not include_plaintext:
            return "plaintext"
        if not dry_run:
            store.rewrite(found, under, newest)
        return "migrated" if under is None else "rotated"
    except ObjectFailed as exc:
        return f"failed:{exc}"


def _encrypt_rule(policy: Policy, provider: str, bucket: str, account: str | None, prefix: str) -> Rule:
    rule = policy.rule_for(provider, bucket, prefix or None, account)
    if rule is None or rule.action != "encrypt" or not rule.key:
        raise RotateError(f"no encrypt rule with a key covers {provider} bucket {bucket}"
                          + (f" prefix {prefix}" if prefix else ""))
    return rule


def add_parser(commands) -> None:
    parser = commands.add_parser("rotate", help="move a bucket's objects onto the newest key version, in place")
    parser.add_argument("--policies", required=True, type=Path, help="policy file (policies.yaml)")
    parser.add_argument("--endpoint", required=True, help="the provider's URL, e.g. https://s3.eu-west-1.amazonaws.com "
                        "(it must be an endpoint of the policy)")
    parser.add_argument("--bucket", required=True, help="the bucket (Azure: the container)")
    parser.add_argument("--account", help="Azure: the storage account (default: from the endpoint's host name)")
    parser.add_argument("--prefix", default="", help="only objects whose names start with this")
    parser.add_argument("--credential", help="the policy credential to use (default: the policy's only one)")
    parser.add_argument("--upstream-ca", type=Path, help="PEM CA trusted for the provider, in addition to the system's")
    parser.add_argument("--region", help="S3 signing region (default: from the endpoint, else us-east-1)")
    parser.add_argument("--dry-run", action="store_true", help="list what would change; change nothing")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--state", type=Path, help="remember finished objects here; a new run skips them")
    parser.add_argument("--include-plaintext", action="store_true", help="also encrypt objects stored without a key")
    parser.add_argument("--report", type=Path, help="write the summary and every object's outcome as JSON here")
    parser.add_argument("--multipart-threshold", type=int, default=DEFAULT_MULTIPART_THRESHOLD,
                        help="S3: objects larger than this (bytes) are copied in parts")
    parser.set_defaults(command=command)


def command(args) -> int:
    from keycourier.dialects import s3
    from keycourier.hostnames import canonical_host
    from keycourier.policy import PolicyError, load_policy
    from keycourier.tls import upstream_trust_bundle

    try:
        policy = load_policy(args.policies)
    except PolicyError as exc:
        print(f"keycourier: invalid policy: {exc}", file=sys.stderr)
        return 2
    url = urlsplit(args.endpoint)
    host, port = canonical_host(url.hostname or ""), url.port or 443
    endpoint = policy.endpoint_for(host, port)
    if url.scheme != "https" or endpoint is None:
        print(f"keycourier: {args.endpoint} is not an https endpoint of the policy", file=sys.stderr)
        return 2
    state = State(args.state)
    private = tempfile.TemporaryDirectory(prefix="keycourier-")
    try:
        account = args.account or host.split(".")[0] if endpoint.provider == "azure" else None
        credential = _credential(policy, args.credential, account)
        trust = str(upstream_trust_bundle(args.upstream_ca, Path(private.name)))
        if endpoint.provider == "s3":
            store = S3Bucket(args.endpoint, args.bucket, credential, args.region or s3.signing_region(
                Request("GET", "https", host, port, "/"), endpoint.region), trust, args.multipart_threshold)
        elif endpoint.provider == "azure":
            store = AzureContainer(args.endpoint, account, args.bucket, credential, upstream_context(trust))
        else:
            raise RotateError(f"{endpoint.provider} takes no customer keys: there is nothing to rotate")
        summary = rotate(policy, store, provider=endpoint.provider, bucket=args.bucket, account=account,
                         prefix=args.prefix, dry_run=args.dry_run, concurrency=args.concurrency, state=state,
                         include_plaintext=args.include_plaintext, progress=Progress())
    except RotateError as exc:
        print(f"keycourier: {exc}", file=sys.stderr)
        return 2
    finally:
        state.close()
        private.cleanup()
    if args.dry_run:
        for change in summary.changes:
            print(f"would {'encrypt' if change['change'] == 'migrated' else 'rotate'}: {change['object']}")
    if args.report:
        args.report.write_text(json.dumps(summary.as_dict(), indent=2))
    counts = summary.as_dict()
    print(", ".join(f"{name.replace('_', ' ')}: {counts[name]}" for name in (
        "examined", "already_current", "rotated", "migrated_from_plaintext", "plaintext_left", "skipped_from_state",
        "failed")))
    return 1 if summary.failed else 0


def _credential(policy: Policy, name: str | None, account: str | None) -> Credential:
    """--credential, else the Azure account's (by its declared account_name), else the policy's only one."""
    if name is None and account in policy.credential_ids:
        name = policy.credential_ids[account].name
    if name is None and len(policy.credentials) != 1:
        raise RotateError(f"the policy has {len(policy.credentials)} credentials: say which with --credential")
    spec = policy.credentials.get(name) if name else next(iter(policy.credentials.values()))
    if spec is None:
        raise RotateError(f"the policy has no credential {name!r}")
    secrets = Secrets()
    try:
        return blocking(lambda: secrets.credential(policy, spec))
    except KeyUnavailable as exc:
        raise RotateError(f"cannot get credential {spec.name!r}: {exc}") from None
