import json

from keycourier.audit import audit_record, format_record
from keycourier.message import Request
from keycourier.pipeline import Audit

REQUEST = Request("PUT", "https", "127.0.0.1", 9000, "/payroll-eu/q3.csv", (("host", "127.0.0.1:9000"),))
AUDIT = Audit(provider="s3", bucket="payroll-eu", operation="PutObject", rule="rule14", action="encrypt",
              key="payroll", key_version="v3", key_fingerprint="OlmsfImY9cdniXEBC4oGsg==")


def test_json_line_has_every_field_the_operators_need():
    record = json.loads(format_record(audit_record(REQUEST.method, AUDIT, client="10.0.0.7", status=200, seconds=0.0123), "json"))
    assert {k: record[k] for k in ("client", "provider", "bucket", "operation", "rule", "action", "key", "key_version",
                                   "key_fingerprint", "outcome", "status", "latency_ms")} == {
        "client": "10.0.0.7", "provider": "s3", "bucket": "payroll-eu", "operation": "PutObject", "rule": "rule14",
        "action": "encrypt", "key": "payroll", "key_version": "v3", "key_fingerprint": "OlmsfImY9cdniXEBC4oGsg==",
        "outcome": "forwarded", "status": 200, "latency_ms": 12.3}
    assert record["time"].endswith("+00:00")


def test_text_line_cannot_be_split_by_client_input():
    evil = Audit(provider="s3", bucket="b\nFAKE keycourier line", operation="PutObject", outcome="refused", reason="no_rule")
    line = format_record(audit_record(REQUEST.method, evil, client="10.0.0.7", status=403, seconds=0.001, message="no rule"), "text")
    assert "\n" not in line and "reason=no_rule status=403" in line and line.endswith(": no rule")
