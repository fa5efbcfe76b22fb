"""Stopping without cutting requests off: on SIGTERM keycourier is unready at once, takes no new
connections, lets the requests in flight finish (for at most the drain period), then exits 0."""
from __future__ import annotations

import asyncio
import logging
import sys

from mitmproxy import ctx, http
from mitmproxy.addons import errorcheck

log = logging.getLogger("keycourier")

POLL_SECONDS = 0.1
LINGER_SECONDS = 0.5  # lets the last answers' bytes leave the socket buffers before the event loop stops


class Drain:
    def __init__(self, keycourier, seconds: float):
        self.keycourier = keycourier
        self.seconds = seconds
        self.in_flight: set[str] = set()  # flows whose answer has not ended
        self._task: asyncio.Task | None = None

    def requestheaders(self, flow: http.HTTPFlow):
        self.in_flight.add(flow.id)

    def response(self, flow: http.HTTPFlow):
        self.in_flight.discard(flow.id)

    def error(self, flow: http.HTTPFlow):
        self.in_flight.discard(flow.id)

    def begin(self):
        """The signal handler: the first signal drains, a second one exits at once."""
        if self._task is not None:
            log.warning("second stop signal: exiting without waiting for requests in flight")
            ctx.master.shutdown()
            return
        self.keycourier.draining = True  # /readyz answers 503 from now on
        self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self):
        log.info(f"stopping: no new connections; waiting up to {self.seconds:g}s for "
                 f"{len(self.in_flight)} requests in flight")
        await ctx.master.addons.get("proxyserver").servers.update([])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(POLL_SECONDS)
        if self.in_flight:
            log.warning(f"drain period over: exiting with {len(self.in_flight)} requests unfinished")
        else:
            await asyncio.sleep(LINGER_SECONDS)
            log.info("stopping: no request in flight")
        ctx.master.shutdown()


class ExitOnStartupError(errorcheck.ErrorCheck):
    """mitmproxy's check, without its own stderr line: the error was already logged in keycourier's format."""

    async def shutdown_if_errored(self):
        await asyncio.sleep(0)  # as mitmproxy's: let pending log records arrive first
        if self.logger.has_errored:
            sys.exit(1)
