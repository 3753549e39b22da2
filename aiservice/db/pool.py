"""Connection pool creation, with the JSON codecs every aiservice connection uses."""

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
    API, nothing on them LISTENs or SETs, and migrate() releases its advisory lock in a finally.
    asyncpg still rolls back a transaction left open before this runs."""


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection[Any]:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn, **kwargs)
    await init_connection(conn)
    return conn


async def create_pool(
    dsn: str,
    *,
    max_size: int = 10,
    application_name: str = "aiservice",
    wait: float = 30.0,
) -> Pool:
    """Open a pool, retrying for up to ``wait`` seconds while PostgreSQL starts."""
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
