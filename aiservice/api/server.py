"""The API's HTTP server: aiohttp's AppRunner behind a guard for slow, idle and surplus connections.

aiohttp reads a request's head for as long as the client takes. Each accepted connection is
wrapped in a ``Guard`` (an asyncio protocol in front of aiohttp's) that closes it when

- its request line and headers have not all arrived HTTP_HEADER_TIMEOUT after the connection
  opened, or after the first byte of a later request on it;
- it sat idle for HTTP_IDLE_TIMEOUT between requests;

and answers 503 (and closes) a connection past HTTP_MAX_CONNECTIONS at once. A body that stops
arriving is the handlers' business (HTTP_BODY_TIMEOUT, 408): only they know whether they read one.
The guard learns that a request's head was complete, and that its answer is ready, from
``guard_middleware``, which sees every request with its transport.

When the process runs out of file descriptors, accept() fails until one is free; asyncio logs
that failure at every retry. ``quiet_accept_errors`` logs it once, then once a minute with the
count of those not logged."""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from aiservice.api.handlers import SETTINGS
from aiservice.settings import Settings

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_REFUSAL_BODY = (
    b'{"error": {"code": "too_many_connections", '
    b'"message": "the server holds HTTP_MAX_CONNECTIONS connections; retry later"}}'
)
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"Content-Length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n\r\n" + _REFUSAL_BODY
)
REPORT_EVERY = 60.0  # seconds between two reports of the same trouble
_OTHER_FILES = 128  # files the process needs besides client connections


class Connections:
    """The open connections of one server, by transport, with the limits they live under."""

    def __init__(self, settings: Settings) -> None:
        self.header_timeout = settings.http_header_timeout.total_seconds()
        self.idle_timeout = settings.http_idle_timeout.total_seconds()
        self.max_connections = settings.http_max_connections
        self.open: dict[asyncio.BaseTransport, Guard] = {}
        self.refused = 0
        self.timed_out = 0
        self._reported_refusals = -REPORT_EVERY

    def refusing(self) -> None:
        self.refused += 1
        now = asyncio.get_running_loop().time()
        if now - self._reported_refusals >= REPORT_EVERY:
            self._reported_refusals = now
            log.warning(
                "refusing connections: %d are open (HTTP_MAX_CONNECTIONS); %d refused so far",
                len(self.open),
                self.refused,
            )


CONNECTIONS = web.AppKey("connections", Connections)


class Guard(asyncio.Protocol):
    """One connection: aiohttp's protocol behind deadlines for the request head and for idleness."""

    def __init__(self, inner: asyncio.Protocol, connections: Connections) -> None:
        self._inner = inner
        self._connections = connections
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reading_head = False
        self._busy = False
        self._refused = False

    # Called by guard_middleware -----------------------------------------------------------------

    def request_started(self) -> None:
        self._busy = True
        self._reading_head = False
        self._cancel()

    def request_finished(self) -> None:
        self._busy = False
        self._arm(self._connections.idle_timeout, head=False)

    # asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if len(self._connections.open) >= self._connections.max_connections:
            self._refused = True
            self._connections.refusing()
            transport.write(REFUSAL)
            transport.close()
            return
        self._connections.open[transport] = self
        self._inner.connection_made(transport)
        self._arm(self._connections.header_timeout, head=True)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if data and not self._busy and not self._reading_head:
            self._arm(self._connections.header_timeout, head=True)  # a new request begins
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._refused:
            return None
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        if not self._refused:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if not self._refused:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        if self._refused:
            return
        if self._transport is not None:
            self._connections.open.pop(self._transport, None)
        self._inner.connection_lost(exc)

    # Deadlines ----------------------------------------------------------------------------------

    def _arm(self, seconds: float, *, head: bool) -> None:
        self._cancel()
        self._reading_head = head
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expired)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._busy or self._transport is None:
            return
        if self._reading_head:
            self._connections.timed_out += 1
            log.debug("closing a connection whose request head did not arrive within HTTP_HEADER_TIMEOUT")
        self._transport.close()


def guard_middleware(connections: Connections) -> Any:
    """Tell each request's guard (when it has one) that its head was complete and when its answer is ready."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        found = connections.open.get(transport) if transport is not None else None
        if found is None:
            return await handler(request)
        found.request_started()
        try:
            return await handler(request)
        finally:
            found.request_finished()

    return guard


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Log accept() failing for want of file descriptors once, then once a minute; hand every other
    loop error to the handler before. Returns a function that puts that handler back."""
    previous = loop.get_exception_handler()
    state = {"reported": -REPORT_EVERY, "unreported": 0}

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            now = loop.time()
            if now - state["reported"] < REPORT_EVERY:
                state["unreported"] += 1
                return
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            log.error(
                "cannot accept connections: %s (open-file limit %s; lower HTTP_MAX_CONNECTIONS or raise the limit)"
                "; %d such failures since the last report",
                exc.strerror or exc,
                soft,
                state["unreported"],
            )
            state["reported"], state["unreported"] = now, 0
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
    return lambda: loop.set_exception_handler(previous)


def _check_open_files(max_connections: int) -> None:
    """Warn when the open-file limit cannot hold HTTP_MAX_CONNECTIONS connections and the rest
    (pool, LISTEN, webhook and provider clients): accept() would fail before the cap refuses."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < max_connections + _OTHER_FILES:
        log.warning(
            "the open-file limit (%d) is below HTTP_MAX_CONNECTIONS (%d) + %d for the rest: raise it "
            "(ulimit -n, LimitNOFILE=, ulimits in compose) or lower HTTP_MAX_CONNECTIONS",
            soft,
            max_connections,
            _OTHER_FILES,
        )


@asynccontextmanager
async def serve(app: web.Application, sockets: Sequence[socket.socket]) -> AsyncIterator[int]:
    """Start the app (its startup runs first: pool, migrations) and serve it on the bound sockets, every
    connection behind a Guard; yields the bound port. On exit: stop listening, close connections
    (requests in flight get aiohttp's shutdown grace), run the app's cleanup."""
    loop = asyncio.get_running_loop()
    settings = app[SETTINGS]
    # After an answer given before the body was read (a 401, a 408), aiohttp reads and drops the rest
    # for lingering_time, so that the client sees the answer: no longer than a body may pause.
    runner = web.AppRunner(
        app,
        keepalive_timeout=settings.http_idle_timeout.total_seconds(),
        lingering_time=min(10.0, settings.http_body_timeout.total_seconds()),
    )
    await runner.setup()
    _check_open_files(settings.http_max_connections)
    restore = quiet_accept_errors(loop)
    try:
        protocols = runner.server
        assert protocols is not None
        connections = app[CONNECTIONS]
        servers = [await loop.create_server(lambda: Guard(protocols(), connections), sock=sock) for sock in sockets]
        try:
            yield int(sockets[0].getsockname()[1])
        finally:
            for server in servers:
                server.close()
    finally:
        await runner.cleanup()
        restore()
