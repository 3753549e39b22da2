"""Slow, idle and surplus connections, with raw sockets on loopback against the server `aiservice
serve` runs (aiservice.api.server.serve): half-sent heads and bodies are cut off, idle keep-alive
connections closed, connections past the cap answered 503 at once, and a process out of file
descriptors says so once rather than at every accept()."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from typing import Any

from processes import ROOT

from aiservice.api.app import create_app
from aiservice.api.server import CONNECTIONS, serve
from aiservice.db.store import JobStore
from aiservice.settings import Settings

SHORT = timedelta(milliseconds=300)
LONG = timedelta(seconds=30)  # longer than any test: only the deadline under test can close
SAFETY = 10.0  # seconds a read waits before the test gives up: never reached when the server behaves


def loopback_socket() -> socket.socket:
    """A socket bound to a free loopback port, as `aiservice serve` binds before it starts."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@asynccontextmanager
async def server(settings: Settings, store: JobStore, **overrides: Any) -> AsyncIterator[tuple[int, Any]]:
    app = create_app(replace(settings, **overrides), store=store)
    async with serve(app, [loopback_socket()]) as port:
        yield port, app[CONNECTIONS]


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes the connection (SAFETY seconds at most); a reset counts as
    a close with nothing more to read."""
    try:
        return await asyncio.wait_for(reader.read(), SAFETY)
    except ConnectionResetError:
        return b""


async def test_a_half_sent_request_head_is_closed_after_the_header_timeout(settings: Settings, store: JobStore) -> None:
    async with server(settings, store, http_header_timeout=SHORT, http_idle_timeout=LONG) as (port, connections):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
        await writer.drain()
        assert await read_all(reader) == b""  # closed, nothing answered
        writer.close()
        assert connections.timed_out == 1

        # A connection that sends nothing at all is closed too.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await read_all(reader) == b""
        writer.close()
        assert connections.timed_out == 2


async def test_a_head_trickled_byte_by_byte_is_cut_off(settings: Settings, store: JobStore) -> None:
    """Each byte arriving does not restart the deadline: the whole head is due within it."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200 + b"\r\n\r\n"
    async with server(settings, store, http_header_timeout=SHORT, http_idle_timeout=LONG) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sent = 0
        try:
            for byte in head:
                writer.write(bytes([byte]))
                await writer.drain()
                sent += 1
                await asyncio.sleep(0.02)
                if reader.at_eof():
                    break
        except ConnectionError:
            pass
        assert await read_all(reader) == b""
        writer.close()
        assert sent < len(head), "the server waited for the whole trickled head"


async def test_a_body_that_stops_arriving_is_answered_408_and_closed(settings: Settings, store: JobStore) -> None:
    async with server(settings, store, http_body_timeout=SHORT, http_header_timeout=LONG, http_idle_timeout=LONG) as (
        port,
        _,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"owner_service": '
        )
        await writer.drain()
        answer = await read_all(reader)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request_timeout" in answer and b"HTTP_BODY_TIMEOUT" in answer


async def test_an_idle_keep_alive_connection_is_closed(settings: Settings, store: JobStore) -> None:
    async with server(settings, store, http_idle_timeout=SHORT, http_header_timeout=LONG) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        answer = await read_all(reader)  # the answer, then the close once idle
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1


async def test_connections_past_the_cap_are_answered_503_at_once(settings: Settings, store: JobStore) -> None:
    async with server(settings, store, http_max_connections=3, http_header_timeout=LONG, http_idle_timeout=LONG) as (
        port,
        connections,
    ):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]

        async def three_open() -> bool:
            return len(connections.open) == 3

        await poll(three_open)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await read_all(reader)  # closed by the server, not by our safety timeout
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer, answer
        assert b"Retry-After: 1" in answer
        assert connections.refused == 1

        # The held ones still work, and a slot freed is a slot for the next client.
        held_reader, held_writer = held[0]
        held_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await read_all(held_reader)).startswith(b"HTTP/1.1 200")
        held_writer.close()

        async def two_open() -> bool:
            return len(connections.open) == 2

        await poll(two_open)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await read_all(reader)).startswith(b"HTTP/1.1 200")
        writer.close()
        for _, w in held[1:]:
            w.close()


async def poll(check: Callable[[], Any], within: float = SAFETY) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


# The server in a child process whose open-file limit is 40, of which the interpreter and the loop
# take some: the test then opens 60 connections, so accept() fails with EMFILE at every retry.
CHILD = textwrap.dedent(
    """
    import asyncio, logging, resource, socket, sys
    from aiohttp import web
    from aiservice.api.handlers import SETTINGS
    from aiservice.api.server import CONNECTIONS, Connections, serve
    from aiservice.settings import Settings

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    resource.setrlimit(resource.RLIMIT_NOFILE, (40, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    async def main():
        settings = Settings()
        app = web.Application()
        app[SETTINGS] = settings
        app[CONNECTIONS] = Connections(settings)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        async with serve(app, [sock]) as port:
            print(port, flush=True)
            await asyncio.sleep(float(sys.argv[1]))

    asyncio.run(main())
    """
)


async def test_running_out_of_file_descriptors_is_logged_once() -> None:
    seconds = 3.5  # asyncio retries accept() every second: three or four failures
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(seconds),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"},
    )
    assert child.stdout is not None
    port = int(await asyncio.wait_for(child.stdout.readline(), 30))
    opened = []
    for _ in range(60):
        try:
            opened.append(await asyncio.open_connection("127.0.0.1", port))
        except OSError:
            break
    _, err = await asyncio.wait_for(child.communicate(), seconds + 30)
    for _, writer in opened:
        writer.close()
    log = err.decode()
    assert child.returncode == 0, log
    lines = [line for line in log.splitlines() if line.strip()]
    told = [line for line in lines if "cannot accept connections" in line]
    assert len(told) == 1, log[-3000:]
    assert "Too many open files" in told[0]
    assert not [line for line in lines if "out of system resource" in line], log[-3000:]
    assert len(lines) <= 5, log[-3000:]
