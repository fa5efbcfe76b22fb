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
