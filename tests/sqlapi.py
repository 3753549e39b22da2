"""The SQL API as tests call it: one helper per public function, named for it, and the few reads
that tests make beside it (a job's row, how many jobs match, how many rows a statement read).

Every SQL-level test (tests/sql/) imports from here; no test module imports another.
Custom SQLSTATEs: AS404 not found, AS409 wrong state, AS410 lease lost (fencing), AS422 invalid argument.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeAlias

import asyncpg
import pytest

Conn: TypeAlias = "asyncpg.Connection[Any]"


JOB: dict[str, Any] = {
    "owner_service": "telephony",
    "owner_ref": "beeline/1",
    "task_type": "llm_chat",
    "model_profile": "qwen2.5-14b",
}


LEASE = timedelta(minutes=15)


RETRYABLE = ["timeout", "rate_limited", "provider_unavailable"]


async def select(conn: Conn, function: str, args: dict[str, Any], columns: str = "*") -> list[asyncpg.Record]:
    """SELECT from aiservice.<function> with named arguments (p_ prefixed)."""
    params = ", ".join(f"p_{name} => ${i}" for i, name in enumerate(args, 1))
    return await conn.fetch(f"SELECT {columns} FROM aiservice.{function}({params}) r", *args.values())


async def call(conn: Conn, function: str, **args: Any) -> list[asyncpg.Record]:
    return await select(conn, function, args)


async def one(conn: Conn, function: str, **args: Any) -> asyncpg.Record:
    (row,) = await select(conn, function, args)
    return row


async def create(conn: Conn, **args: Any) -> asyncpg.Record:
    """aiservice.create_job; the row holds the job's columns and `created`."""
    (row,) = await select(conn, "create_job", JOB | args, "(r.job).*, r.created")
    return row


async def create_jobs(conn: Conn, jobs: list[dict[str, Any]], defaults: dict[str, Any] | None = None) -> list[Any]:
    args: dict[str, Any] = {"jobs": jobs}
    if defaults is not None:
        args["defaults"] = defaults
    return await select(conn, "create_jobs", args, "(r.job).*, r.created")


async def claim(conn: Conn, worker: str = "w1", limit: int = 1, **args: Any) -> list[asyncpg.Record]:
    return await call(conn, "claim_jobs", worker_id=worker, limit=limit, **args)


async def running(conn: Conn, worker: str = "w1", lease: timedelta = LEASE, **args: Any) -> asyncpg.Record:
    """A new job claimed by `worker` (created at top priority so that it is the one claimed)."""
    job = await create(conn, **({"priority": 1000} | args))
    (claimed,) = await claim(conn, worker, lease_timeout=lease)
    assert claimed["id"] == job["id"]
    return claimed


async def get(conn: Conn, job_id: int) -> asyncpg.Record:
    return await one(conn, "get_job", id=job_id)


async def refused(sqlstate: str, awaitable: Awaitable[Any]) -> str:
    with pytest.raises(asyncpg.PostgresError) as info:
        await awaitable
    assert info.value.sqlstate == sqlstate, f"{info.value.sqlstate}: {info.value}"
    return str(info.value)


async def count(conn: Conn, where: str = "true") -> int:
    n: int = await conn.fetchval(f"SELECT count(*) FROM aiservice.all_jobs WHERE {where}")
    return n


async def expire_lease(conn: Conn, job_id: int) -> None:
    await conn.execute("UPDATE aiservice.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1", job_id)


async def set_limit(conn: Conn, scope: str, name: str, **fields: Any) -> asyncpg.Record:
    return await one(conn, "set_limit", scope=scope, name=name, fields=fields)


BASE = {"owner_service": "tel", "task_type": "llm_chat", "model_profile": "qwen"}


async def jobs(conn: Conn, n: int, **defaults: Any) -> list[int]:
    rows = await create_jobs(conn, [{"owner_ref": f"r{i}"} for i in range(n)], BASE | defaults)
    return [r["id"] for r in rows]


READS = """
SELECT (SELECT coalesce(seq_tup_read, 0) FROM pg_stat_user_tables WHERE relid = $1::regclass)
     + (SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes WHERE relid = $1::regclass)
"""


async def rows_read(conn: Conn, table: str = "aiservice.jobs") -> int:
    """Rows of ``table`` read so far: sequential scans plus index entries (PostgreSQL's own counters)."""
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return int(await conn.fetchval(READS, table))


async def claim_tokens(conn: Conn, limit: int = 10) -> list[asyncpg.Record]:
    """Up to ``limit`` jobs claimed by worker 'w': their ids and lease tokens."""
    return await conn.fetch("SELECT id, lease_token FROM aiservice.claim_jobs('w', $1)", limit)


# Statements as a careless or hostile caller types them (the guard tests).


def q(sql: str) -> str:
    """create_job(s) return (job, created): select the job's columns, which asyncpg can decode."""
    if sql.startswith("SELECT * FROM aiservice.create_job"):
        return "SELECT (r.job).* FROM" + sql.removeprefix("SELECT * FROM") + " r"
    return sql


async def refused_statement(conn: Conn, sqlstate: str, sql: str, *args: Any) -> None:
    with pytest.raises(asyncpg.PostgresError) as caught:
        await conn.fetch(q(sql), *args)
    assert caught.value.sqlstate == sqlstate, (sql, args, caught.value.sqlstate, str(caught.value))


# Concurrent callers on separate connections (the `connections` fixture is in tests/sql/conftest.py).
Connections = Callable[[int], Awaitable[list[Conn]]]

CREATE_JOBS = "SELECT (r.job).id, r.created FROM aiservice.create_jobs($1, $2) r"


async def together(calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run the calls concurrently, released at once so that they really overlap."""
    start = asyncio.Event()

    async def run(fn: Callable[[], Awaitable[Any]]) -> Any:
        await start.wait()
        return await fn()

    tasks = [asyncio.ensure_future(run(fn)) for fn in calls]
    await asyncio.sleep(0)
    start.set()
    async with asyncio.timeout(30):
        return await asyncio.gather(*tasks)
