"""The audit log: one line per intercepted request, as text or JSON. Names and fingerprints, never keys."""
from __future__ import annotations

import json
from dataclasses import fields
from datetime import datetime, timezone

from keycourier.pipeline import Audit
from keycourier.response import header_safe

FORMATS = ("text", "json")
AUDIT_FIELDS = tuple(field.name for field in fields(Audit))  # dataclasses.asdict would deep-copy each value


def audit_record(method: str, audit: Audit, *, client: str, status: int | None, seconds: float,
                 message: str | None = None) -> dict:
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "client": client,
        "method": method,
        **{name: getattr(audit, name) for name in AUDIT_FIELDS},
        "status": status,
        "latency_ms": round(seconds * 1000, 1),
        **({"message": message} if message else {}),
    }


def format_record(record: dict, log_format: str) -> str:
    if log_format == "json":
        return json.dumps(record, separators=(",", ":"))
    key = f" key={record['key']} {record['key_version']} fingerprint={record['key_fingerprint']}" if record["key"] else ""
    reason = f" reason={record['reason']}" if record["reason"] else ""
    message = f": {record['message']}" if "message" in record else ""
    # Client input (bucket names) is quoted through header_safe so it cannot forge extra log lines.
    return header_safe(
        f"{record['client']} {record['method']} {record['provider']} "
        f"{'account=' + record['account'] + ' ' if record['account'] else ''}bucket={record['bucket']} op={record['operation']} "
        f"rule={record['rule']} action={record['action']}{key} -> {record['outcome']}{reason} "
        f"status={record['status']} {record['latency_ms']}ms{message}", limit=2000)
