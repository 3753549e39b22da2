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


async def complete(c: Conn, job_id: int, worker: str, token: Any = None) -> str:
    try:
        await c.execute("SELECT id FROM aiservice.complete_job($1, $2, $3, $4)", job_id, worker, {"by": worker}, token)
    except asyncpg.PostgresError as exc:
        return str(exc.sqlstate)
    return "ok"


async def waiting_for_a_lock(conn: Conn, pid: int) -> None:
    """Until the backend ``pid`` waits for a lock another transaction holds."""

    async def waits() -> bool:
        return bool(await conn.fetchval("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid))

    await wait_for(waits, what=f"backend {pid} to wait for a lock")


async def test_writers_of_many_jobs_never_deadlock(conn: Conn, connections: Connections) -> None:
    """complete_jobs, cancel_jobs and retry_jobs on overlapping jobs, given in different orders: all
    lock in ascending id order, so they wait for each other but never in a cycle."""
    completer, canceller, retrier = await connections(3)
    outcomes: Counter[str] = Counter()
    for round_ in range(30):
        task_type = f"overlap_{round_}"
        await conn.fetch(CREATE_JOBS, [{"owner_ref": str(i)} for i in range(40)], JOB | {"task_type": task_type})
        claimed = await conn.fetch("SELECT id, lease_token FROM aiservice.claim_jobs('w1', 40, ARRAY[$1])", task_type)
        ids = sorted(r["id"] for r in claimed)
        assert len(ids) == 40

        async def run(c: Conn, sql: str, *args: Any) -> str:
            try:
                await c.fetch(sql, *args)
            except asyncpg.PostgresError as exc:
                return str(exc.sqlstate)
            return "ok"

        complete = "SELECT * FROM aiservice.complete_jobs('w1', $1, $2)"
        calls = [
            partial(run, completer, complete, ids[5:], [{"round": round_}] * 35),
            partial(run, canceller, "SELECT * FROM aiservice.cancel_jobs(p_ids => $1)", ids[::-1][:30]),
            partial(run, retrier, "SELECT * FROM aiservice.retry_jobs(p_ids => $1)", ids[10:][::-1]),
        ]
        outcomes.update(await together(calls))
    assert outcomes == Counter({"ok": 90}), outcomes


async def test_cancel_jobs_checks_its_filter_again_on_the_job_it_locked(conn: Conn, connections: Connections) -> None:
    """A claim makes the job running while cancel_jobs(statuses => pending) waits for its lock: the
    running job is left alone."""
    claimer, canceller = await connections(2)
    job_id = await conn.fetchval("SELECT (r.job).id FROM aiservice.create_job('s', 'r', 'recheck', 'm') r")
    claim = claimer.transaction()
    await claim.start()
    assert [r["id"] for r in await claimer.fetch("SELECT id FROM aiservice.claim_jobs('w1', 1, ARRAY['recheck'])")] == [
        job_id
    ]
    cancel = asyncio.ensure_future(
        canceller.fetch("SELECT * FROM aiservice.cancel_jobs(p_ids => $1, p_statuses => '{pending}')", [job_id])
    )
    await waiting_for_a_lock(conn, canceller.get_server_pid())
    await claim.commit()
    assert await cancel == []
    assert await conn.fetchval("SELECT status::text FROM aiservice.all_jobs WHERE id = $1", job_id) == "running"


async def test_retry_jobs_checks_its_filter_again_on_the_job_it_locked(conn: Conn, connections: Connections) -> None:
    """The job fails while retry_jobs(statuses => running) waits for its lock: the failed job stays failed."""
    failer, retrier = await connections(2)
    job_id = await conn.fetchval("SELECT (r.job).id FROM aiservice.create_job('s', 'r', 'recheck', 'm') r")
    await conn.execute("SELECT 1 FROM aiservice.claim_jobs('w1', 1, ARRAY['recheck'])")
    fail = failer.transaction()
    await fail.start()
    await failer.execute("SELECT 1 FROM aiservice.fail_job($1, 'w1', 'invalid_input', 'bad')", job_id)
    retry = asyncio.ensure_future(
        retrier.fetch("SELECT * FROM aiservice.retry_jobs(p_ids => $1, p_statuses => '{running}')", [job_id])
    )
    await waiting_for_a_lock(conn, retrier.get_server_pid())
    await fail.commit()
    assert await retry == []
    assert await conn.fetchval("SELECT status::text FROM aiservice.all_jobs WHERE id = $1", job_id) == "failed"


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
