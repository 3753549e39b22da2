"""The SQL API under concurrent callers on separate connections (SKIP LOCKED, idempotency, fencing)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, TypeAlias

import asyncpg
import pytest
from stubs import wait_for

from aiservice.db.pool import connect

Conn: TypeAlias = "asyncpg.Connection[Any]"
Connections = Callable[[int], Awaitable[list[Conn]]]

JOB: dict[str, Any] = {
    "owner_service": "telephony",
    "owner_ref": "beeline/1",
    "task_type": "llm_chat",
    "model_profile": "qwen2.5-14b",
}
CREATE_JOB = """
    SELECT (r.job).id, r.created
    FROM aiservice.create_job($1, $2, $3, $4, p_idempotency_key => $5) r
"""
CREATE_JOBS = "SELECT (r.job).id, r.created FROM aiservice.create_jobs($1, $2) r"


@pytest.fixture
async def connections(database_url: str) -> AsyncIterator[Connections]:
    """Open n more connections to the test database; all are closed after the test."""
    opened: list[Conn] = []

    async def open_n(n: int) -> list[Conn]:
        conns = await asyncio.gather(*(connect(database_url) for _ in range(n)))
        opened.extend(conns)
        return list(conns)

    yield open_n
    await asyncio.gather(*(c.close() for c in opened))


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


async def test_a_batch_finished_by_concurrent_completers_is_announced_once(
    conn: Conn, connections: Connections, database_url: str
) -> None:
    """Four workers complete the four jobs of each of 40 batches at the same time: every batch is
    finished, announced and queued for its webhook exactly once."""
    await conn.fetch(
        "SELECT FROM aiservice.set_webhook($1, 'http://127.0.0.1:9/hook', $2)", JOB["owner_service"], "s" * 32
    )
    batches = []
    for b in range(40):
        rows = await conn.fetch(CREATE_JOBS, [{"owner_ref": f"{b}/{i}"} for i in range(4)], JOB)
        batches.append(sorted(r["id"] for r in rows))
    claimed = {
        r["id"]: r["lease_token"]
        for r in await conn.fetch("SELECT id, lease_token FROM aiservice.claim_jobs('w', 160)")
    }
    assert len(claimed) == 160
    heard: list[dict[str, Any]] = []
    listener = await connect(database_url)
    await listener.add_listener("aiservice_finished", lambda *args: heard.append(json.loads(args[-1])))
    workers = await connections(4)

    async def work(c: Conn, i: int) -> None:
        for ids in batches:
            await c.fetch("SELECT id FROM aiservice.complete_job($1, 'w', '{}', $2)", ids[i], claimed[ids[i]])

    try:
        await together([partial(work, c, i) for i, c in enumerate(workers)])
        finished = await conn.fetch("SELECT id FROM aiservice.batches WHERE finished_at IS NOT NULL AND completed = 4")
        assert len(finished) == 40
        hooks = await conn.fetch(
            "SELECT batch_id, count(*) AS n FROM aiservice.webhook_deliveries WHERE event = 'batch.finished' GROUP BY 1"
        )
        assert sorted(r["n"] for r in hooks) == [1] * 40

        async def all_heard() -> bool:
            return sum(1 for p in heard if p.get("batch_finished")) >= 40

        await wait_for(all_heard, what="40 batch_finished notifications")
        announced = Counter(p["batch_id"] for p in heard if p.get("batch_finished"))
        assert sorted(announced.values()) == [1] * 40
    finally:
        await listener.close()
