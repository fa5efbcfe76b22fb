"""Logs hold no object name and no body byte: other libraries' lines are cut before their first quoted part."""
import logging

from keycourier import logs


def test_quoted_parts_of_other_libraries_lines_are_withheld(caplog):
    logs.install()
    logs.install()  # idempotent
    with caplog.at_level(logging.INFO):
        logging.getLogger("mitmproxy.proxy.server").info("Client closed connection: %r", b"PUT /bucket/secret-name")
        logging.getLogger("mitmproxy.proxy.server").info('Invalid header line: "x-secret: y"')
        logging.getLogger("mitmproxy.proxy.server").info("client disconnect")
        logging.getLogger("keycourier").info("bucket payroll 'kept as written'")
        try:
            raise ValueError("failed on b'secret-body-bytes'")
        except ValueError:
            logging.getLogger("mitmproxy.proxy.server").exception("mitmproxy has crashed!")
    text = caplog.text
    assert "secret-name" not in text and "x-secret" not in text and "secret-body-bytes" not in text
    assert "Client closed connection: [details withheld by keycourier]" in text
    assert "client disconnect" in text and "'kept as written'" in text and "(ValueError)" in text


def record(name: str, message: str, **extra) -> logging.LogRecord:
    made = logging.LogRecord(name, logging.INFO, __file__, 1, message, None, None)
    made.__dict__.update(extra)
    return made


def test_json_lines_carry_time_level_and_the_audit_fields():
    import json

    formatter = logs.JsonFormatter()
    line = json.loads(formatter.format(record("mitmproxy.proxy.server", "client connect", client=("10.0.0.7", 50000))))
    assert line["message"] == "client connect" and line["client"] == "10.0.0.7:50000" and line["level"] == "info"
    assert line["time"].endswith("Z")
    audit = json.loads(formatter.format(record("keycourier", "text form", audit={"bucket": "b", "outcome": "refused"})))
    assert audit["event"] == "audit" and audit["bucket"] == "b" and "message" not in audit


def test_connection_chatter_is_recognised_only_from_mitmproxy():
    assert logs.is_connection_chatter(record("mitmproxy.proxy.server", "server disconnect 127.0.0.1:9000"))
    assert logs.is_connection_chatter(record("mitmproxy.proxy.server", "Streaming request to 127.0.0.1."))
    assert not logs.is_connection_chatter(record("mitmproxy.proxy.server", "Client TLS handshake failed."))
    assert not logs.is_connection_chatter(record("keycourier", "client connect"))
