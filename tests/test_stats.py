"""Statistics over HTTP. The counters themselves (equal to a full recount): tests/sql/test_stats.py."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, TypeAlias

import asyncpg

from aiservice.db.store import JobStore
from aiservice.jobs import JobCreate, JobStatus

Conn: TypeAlias = "asyncpg.Connection[Any]"

RECOUNT = """
SELECT status::text, task_type, model_profile, count(*)
FROM aiservice.all_jobs GROUP BY 1, 2, 3
"""


async def fleet(store: JobStore) -> None:
    """Jobs of two kinds in every status, with a retried failure and a terminal one."""
    specs = [
        JobCreate(owner_service="t", owner_ref=str(i), task_type=t, model_profile=m)
        for i in range(60)
        for t, m in [("llm_chat", "qwen"), ("transcribe", "whisperx")][i % 2 : i % 2 + 1]
    ]
    await store.create_jobs(specs)
    claimed = await store.claim_jobs("w1", 30, lease_timeout=timedelta(minutes=5))
    for job in claimed[:10]:
        await store.complete_job(job.id, "w1", {"ok": True})
    for job in claimed[10:15]:
        await store.fail_job(job.id, "w1", "invalid_input", "bad", retryable=False)
    for job in claimed[15:20]:
        await store.fail_job(job.id, "w1", "timeout", "slow")  # back to pending
    await store.cancel_job(claimed[20].id)
    await store.retry_job(claimed[10].id)


async def test_stats_over_http(api: Any, store: JobStore) -> None:
    await fleet(store)
    response = await api.get("/api/v1/stats", params={"window": "60"})
    assert response.status == 200
    body = await response.json()
    assert body["window_seconds"] == 60
    assert (await api.get("/api/v1/stats", params={"window": "-1"})).status == 422


async def test_totals_hold_every_status_zeros_included(api: Any, store: JobStore, conn: Conn) -> None:
    response = await api.get("/api/v1/stats")
    assert response.status == 200
    assert (await response.json())["totals"] == {s.value: 0 for s in JobStatus}

    await fleet(store)
    recount = {s.value: 0 for s in JobStatus}
    for status, _, _, n in await conn.fetch(RECOUNT):
        recount[status] += n
    assert (await store.stats()).totals.model_dump() == recount
    await store.compact_counts()
    assert (await (await api.get("/api/v1/stats")).json())["totals"] == recount
    assert recount["pending"] and recount["running"] and recount["completed"] and recount["failed"]
