"""What reaches the log: keycourier's own lines name accounts, buckets and key fingerprints, never object
names or bytes of a body. Other libraries' lines (mitmproxy's protocol errors quote raw request lines
and leftover body bytes) are cut before their first quoted part, whichever handler prints them."""
from __future__ import annotations

import logging
import re

OWN_LOGGER = "keycourier"
WITHHELD = "[details withheld by keycourier]"
_FIRST_QUOTE = re.compile(r"""b?['"]""")


def withhold_details(message: str) -> str:
    """The message up to its first quoted part (a repr of request bytes, a quoted name)."""
    found = _FIRST_QUOTE.search(message)
    return message if found is None else f"{message[: found.start()].rstrip()} {WITHHELD}"


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
            if made.exc_info:  # exception texts quote what they failed on
                made.msg, made.exc_info, made.exc_text = f"{made.msg} ({made.exc_info[0].__name__})", None, None
        return made

    record.keycourier = True
    logging.setLogRecordFactory(record)
