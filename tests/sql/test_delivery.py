"""Batches and deliveries (schema/functions/delivery.sql): list_batches, and a batch announced once."""

from __future__ import annotations

import json
from collections import Counter
from functools import partial
from typing import Any

import asyncpg
import pytest
from sqlapi import CREATE_JOBS, JOB, Conn, Connections, rows_read, together
from stubs import wait_for

from aiservice.db.pool import connect
from aiservice.db.store import JobStore
from aiservice.jobs import JobCreate

# --- The SQL API under concurrent callers on separate connections (SKIP LOCKED, idempotency, fencing).


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


# --- The read routes the operator console uses: batches listed newest first, jobs by error category, a job's
# dependencies and dependents, webhook deliveries that keep retrying. SQL and HTTP alike.


async def batch(store: JobStore, owner: str, n: int = 1) -> int:
    spec = {"owner_service": owner, "task_type": "llm_chat", "model_profile": "m"}
    created = await store.create_jobs([JobCreate.model_validate(spec | {"owner_ref": f"r/{i}"}) for i in range(n)])
    batch_id = created[0][0].batch_id
    assert batch_id is not None
    return batch_id


async def test_list_batches_pages_newest_first_and_filters_by_owner(conn: Conn, store: JobStore) -> None:
    ids = [await batch(store, owner, n) for owner, n in [("a", 1), ("b", 2), ("a", 3), ("b", 1), ("a", 2)]]
    rows = [r[0] for r in await conn.fetch("SELECT * FROM aiservice.list_batches()")]
    assert [r["id"] for r in rows] == ids[::-1]
    assert rows[0] == await conn.fetchval("SELECT aiservice.get_batch($1)", ids[-1])  # the same shape

    owned = "SELECT r->>'id' FROM aiservice.list_batches(p_owner_service => $1, p_before_id => $2, p_limit => $3) r"
    assert [int(r[0]) for r in await conn.fetch(owned, "a", None, 2)] == [ids[4], ids[2]]
    assert [int(r[0]) for r in await conn.fetch(owned, "a", ids[2], 2)] == [ids[0]]
    assert [int(r[0]) for r in await conn.fetch(owned, "nobody", None, 2)] == []
    with pytest.raises(asyncpg.PostgresError) as exc:
        await conn.fetch("SELECT * FROM aiservice.list_batches(p_limit => -1)")
    assert exc.value.sqlstate == "AS422"

    page = await store.list_batches("b", before_id=None, limit=10)
    assert [(b.id, b.owner_service, b.counts.total) for b in page] == [(ids[3], "b", 1), (ids[1], "b", 2)]


async def test_a_page_of_batches_reads_a_page_of_rows(conn: Conn, store: JobStore) -> None:
    await conn.execute(
        "INSERT INTO aiservice.batches (owner_service, total) SELECT 'bulk', 0 FROM generate_series(1, 2000)"
    )
    rare = [await batch(store, "rare") for _ in range(3)]
    await conn.execute(
        "INSERT INTO aiservice.batches (owner_service, total) SELECT 'bulk', 0 FROM generate_series(1, 2000)"
    )
    await conn.execute("ANALYZE aiservice.batches")
    page = "SELECT * FROM aiservice.list_batches(p_owner_service => $1, p_before_id => $2, p_limit => 2)"
    for owner, before in [("rare", None), (None, None), ("rare", rare[2]), ("bulk", rare[0])]:
        start = await rows_read(conn, "aiservice.batches")  # read on this connection: its counters are flushed
        assert len(await conn.fetch(page, owner, before)) == 2
        assert await rows_read(conn, "aiservice.batches") - start <= 6, (owner, before)
