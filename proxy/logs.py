"""What reaches the log: keycourier's own lines name accounts, buckets and key fingerprints, never object
names or bytes of a body. Other libraries' lines (mitmproxy's protocol errors quote raw request lines
and leftover body bytes) are cut before their first quoted part, whichever handler prints them."""
from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone

OWN_LOGGER = "keycourier"
WITHHELD = "[details withheld by keycourier]"
_FIRST_QUOTE = re.compile(r"""b?['"]""")


def withhold_details(message: str) -> str:
    """The message up to its first quoted part (a repr of request bytes, a quoted name)."""
    found = _FIRST_QUOTE.search(message)
    return message if found is None else f"{message[: found.start()].rstrip()} {WITHHELD}"


def _exception_text(exc_info) -> str:
    """The exception's type, and its message too when keycourier raised it (its messages name no object)."""
    kind, error, trace = exc_info
    while trace and trace.tb_next:
        trace = trace.tb_next
    module = trace.tb_frame.f_globals.get("__name__", "") if trace else ""
    own = module.startswith(OWN_LOGGER) or module.startswith("__mitmproxy_script__.keycourier")
    return f"{kind.__name__}: {error}" if own else kind.__name__


def install() -> None:
    """Every log record made from now on, by any library, goes through withhold_details unless keycourier
    made it. A record factory, not a handler filter: it holds for handlers added later too."""
    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "keycourier", False):
        return

    def record(*args, **kwargs) -> logging.LogRecord:
        made = make_record(*args, **kwargs)
        if made.name != OWN_LOGGER and not made.name.startswith(OWN_LOGGER + "."):
            made.msg, made.args = withhold_details(made.getMessage()), None
            if made.exc_info:  # exception texts quote what they failed on, unless keycourier wrote them
                made.msg, made.exc_info, made.exc_text = f"{made.msg} ({_exception_text(made.exc_info)})", None, None
        return made

    record.keycourier = True
    logging.setLogRecordFactory(record)


# mitmproxy's per-connection lines: one pair per connection and per upstream, noise at any real load.
_CONNECTION_CHATTER = re.compile(r"(client|server) (connect|disconnect)\b|Streaming (request to|response from) ")


def is_connection_chatter(record: logging.LogRecord) -> bool:
    return record.name.startswith("mitmproxy.") and _CONNECTION_CHATTER.match(record.getMessage()) is not None


class TextFormatter(logging.Formatter):
    """`2026-01-02T03:04:05.678Z INFO message`; mitmproxy's lines also name the client's address."""

    def format(self, record: logging.LogRecord) -> str:
        client = _client(record)
        line = f"{_timestamp(record)} {record.levelname} {f'[{client}] ' if client else ''}{record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line. An audit line carries the audit record's fields (its `time` is the request's
    end); any other line has `message`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict = {"time": _timestamp(record), "level": record.levelname.lower(), "logger": record.name}
        audit = getattr(record, "audit", None)
        if audit is not None:
            entry |= {"event": "audit", **audit}
        else:
            entry["message"] = record.getMessage()
        if client := _client(record):
            entry["client"] = client
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


FORMATTERS = {"text": TextFormatter, "json": JsonFormatter}


def log_to_stream(stream, log_format: str, *, verbose: bool) -> logging.Handler:
    """keycourier's one log handler, on the root logger: every library's lines in one format on `stream`."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(FORMATTERS[log_format]())
    handler.setLevel(logging.INFO)
    if not verbose:
        handler.addFilter(lambda record: not is_connection_chatter(record))
    logging.getLogger().addHandler(handler)
    return handler


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _client(record: logging.LogRecord) -> str | None:
    """mitmproxy passes the client's (host, port) as `client`."""
    client = getattr(record, "client", None)
    if isinstance(client, tuple) and len(client) >= 2:
        return f"{client[0]}:{client[1]}"
    return None
