"""Connection pool creation, with the JSON codecs every aiservice connection uses.

Behind pgbouncer in transaction pooling mode (DATABASE_PGBOUNCER=true) each transaction may run on
another server connection, so nothing may outlive a transaction on the server: no named prepared
statements (asyncpg's statement cache is turned off; its unnamed statements are parsed, bound and
run before one Sync), no LISTEN, no session SET or session-level advisory lock. (asyncpg's type
introspection turns jit off around its query and back with two session-level set_config calls; through
the pooler one server connection may keep jit off, which changes no result.)"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import asyncpg

from aiservice.settings import mask_url

log = logging.getLogger(__name__)

Pool = asyncpg.Pool


async def init_connection(conn: asyncpg.Connection[Any]) -> None:
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def keep_session(conn: asyncpg.Connection[Any]) -> None:
    """Pool release without asyncpg's reset query (a whole round trip per call otherwise).

    Pooled connections carry no session state to clear: each call is one statement of the SQL
    API, nothing on them LISTENs or SETs (migrate() uses SET LOCAL), and migrate() holds its
    advisory lock for its transaction only. asyncpg still rolls back a transaction left open
    before this runs."""


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection[Any]:
    """A single connection (migrate, scripts, tests), without a statement cache unless asked for:
    it saves little on a few statements, and a named statement left on a server connection behind
    a transaction-mode pgbouncer would collide with another client's of the same name."""
    kwargs.setdefault("statement_cache_size", 0)
    conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn, **kwargs)
    await init_connection(conn)
    return conn


class DatabaseUnreachable(Exception):
    """PostgreSQL did not take a connection at start: the message is one line for the operator,
    naming the server (password masked) and the variable that points at it."""


# Worth waiting for: PostgreSQL (or the network to it) may still be starting.
_TRANSIENT = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)
CONNECT_TIMEOUT = 10.0  # per attempt; asyncpg's own default is a minute


def where(dsn: str) -> str:
    """host:port (or the socket directory) of a DSN, for messages."""
    try:
        parts = urlsplit(dsn)
        query = dict(parse_qsl(parts.query))
        hosts = query.get("host") or parts.netloc.rsplit("@", 1)[-1]
        port = query.get("port")
    except ValueError:
        return "an unreadable address"
    if not hosts:
        return "the default local socket"
    shown = []
    for host in hosts.split(","):
        if host.startswith("/"):
            shown.append(f"socket directory {host}")
        elif port and not host.rsplit("]", 1)[-1].count(":"):
            shown.append(f"{host}:{port}")
        elif host.rsplit("]", 1)[-1].count(":"):
            shown.append(host)
        else:
            shown.append(f"{host}:5432")
    return ", ".join(shown)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"host name not resolved ({exc.strerror})"
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g}s"
    if isinstance(exc, asyncpg.PostgresError):
        return str(getattr(exc, "message", None) or exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    # asyncpg reports several failed addresses (::1 and 127.0.0.1 for localhost) as one OSError.
    text = str(exc) or type(exc).__name__
    return "connection refused" if "Connect call failed" in text else text


T = TypeVar("T")


async def open_waiting(
    open_: Callable[[], Awaitable[T]],
    dsn: str,
    *,
    wait: float,
    variable: str = "DATABASE_URL",
    wait_variable: str = "DATABASE_CONNECT_WAIT",
) -> T:
    """Call ``open_`` (a connection or a pool to ``dsn``) until it succeeds, for up to ``wait`` seconds
    while PostgreSQL is unreachable or starting. A refusal that waiting will not heal (wrong password,
    unknown role or database, no pg_hba entry) and the end of the wait raise DatabaseUnreachable."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    delay = 0.5
    server = f"PostgreSQL at {where(dsn)} ({variable}={mask_url(dsn)})"
    while True:
        try:
            return await open_()
        except _TRANSIENT as exc:
            reason = _reason(exc)
            left = deadline - loop.time()
            if left <= 0:
                waited = f"gave up after {wait:g}s ({wait_variable})" if wait else f"not retried ({wait_variable}=0)"
                raise DatabaseUnreachable(f"cannot connect to {server}: {reason}; {waited}") from exc
            pause = min(delay, left)
            log.warning(
                "waiting for %s to accept connections (%s): next try in %.1fs, giving up %.1fs from now (%s=%s)",
                server,
                reason,
                pause,
                left,
                wait_variable,
                f"{wait:g}s",
            )
            await asyncio.sleep(pause)
            delay = min(delay * 2, 5.0)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
            # Authentication, an unknown role or database, a malformed DSN: retrying will not help.
            raise DatabaseUnreachable(f"{server} refused the connection: {_reason(exc)} (not retried)") from exc


async def create_pool(
    dsn: str,
    *,
    max_size: int = 10,
    application_name: str = "aiservice",
    wait: float = 30.0,
    pgbouncer: bool = False,
    variable: str = "DATABASE_URL",
) -> Pool:
    """Open a pool, waiting up to ``wait`` seconds while PostgreSQL starts (see open_waiting); with
    ``pgbouncer`` its connections prepare no named statements (transaction pooling, see the module's docstring)."""

    async def open_() -> Pool:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=max_size,
            init=init_connection,
            reset=keep_session,
            server_settings={"application_name": application_name},
            statement_cache_size=0 if pgbouncer else 100,
            timeout=CONNECT_TIMEOUT,
        )
        assert pool is not None
        return pool

    return await open_waiting(open_, dsn, wait=wait, variable=variable)


async def ensure_database(server_dsn: str, name: str) -> None:
    """Create database ``name`` on the server unless it exists (for embedded PostgreSQL)."""
    conn: asyncpg.Connection[Any] = await asyncpg.connect(server_dsn)
    try:
        if not await conn.fetchval("SELECT true FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name.replace(chr(34), chr(34) * 2)}"')
    finally:
        await conn.close()
