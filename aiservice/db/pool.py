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
from typing import Any

import asyncpg

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


async def create_pool(
    dsn: str,
    *,
    max_size: int = 10,
    application_name: str = "aiservice",
    wait: float = 30.0,
    pgbouncer: bool = False,
) -> Pool:
    """Open a pool, retrying for up to ``wait`` seconds while PostgreSQL starts; with ``pgbouncer``
    its connections prepare no named statements (transaction pooling, see the module's docstring)."""
    delay = 0.2
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=max_size,
                init=init_connection,
                reset=keep_session,
                server_settings={"application_name": application_name},
                statement_cache_size=0 if pgbouncer else 100,
            )
            assert pool is not None
            return pool
        except (OSError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError) as exc:
            if asyncio.get_running_loop().time() + delay > deadline:
                raise
            log.warning("PostgreSQL not reachable yet (%s); retrying", type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def ensure_database(server_dsn: str, name: str) -> None:
    """Create database ``name`` on the server unless it exists (for embedded PostgreSQL)."""
    conn: asyncpg.Connection[Any] = await asyncpg.connect(server_dsn)
    try:
        if not await conn.fetchval("SELECT true FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name.replace(chr(34), chr(34) * 2)}"')
    finally:
        await conn.close()
