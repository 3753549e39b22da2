"""Statistics kept by counters: equal to a full recount, before and after compaction."""

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


def as_counts(stats: Any) -> dict[tuple[str, str, str], int]:
    return {(s.status.value, s.task_type, s.model_profile): s.count for s in stats.by_status}


async def test_counters_equal_a_recount_before_and_after_compaction(store: JobStore, conn: Conn) -> None:
    await fleet(store)
    recount = {(r[0], r[1], r[2]): r[3] for r in await conn.fetch(RECOUNT)}
    assert as_counts(await store.stats()) == recount
    assert await conn.fetchval("SELECT count(*) FROM aiservice.job_count_deltas") > 0
    assert await store.compact_counts() > 0
    assert await conn.fetchval("SELECT count(*) FROM aiservice.job_count_deltas") == 0
    assert as_counts(await store.stats()) == recount
    await conn.execute("DELETE FROM aiservice.job_history WHERE status = 'completed'")
    recount = {(r[0], r[1], r[2]): r[3] for r in await conn.fetch(RECOUNT)}
    assert as_counts(await store.stats()) == recount


async def test_windowed_figures(store: JobStore, conn: Conn) -> None:
    await fleet(store)
    await store.compact_counts()
    stats = await store.stats(timedelta(minutes=30))
    assert stats.window_seconds == 1800
    # 5 terminal failures happened; one job was retried since, and its failure still counts.
    assert stats.completed_per_minute.last_5m == 10 / 5
    assert stats.completed_per_minute.last_60m == 10 / 60
    assert [(e.error_category, e.count) for e in stats.errors] == [("invalid_input", 5)]
    assert [(e.error_category, e.count) for e in stats.errors_last_hour] == [("invalid_input", 5)]
    assert [(w.worker_id, w.count) for w in stats.running_by_worker] == [("w1", 9)]
    assert {p.task_type for p in stats.oldest_pending} == {"llm_chat", "transcribe"}
    latency = {row.task_type: row for row in stats.latency}
    assert sum(row.count for row in latency.values()) == 10 + 4 + 1  # completed, still failed, cancelled
    for row in latency.values():
        assert 0 <= row.wait_p50_ms <= row.wait_p95_ms
        assert 0 <= row.run_p50_ms <= row.run_p95_ms


async def test_old_finishes_leave_the_windows(store: JobStore, conn: Conn) -> None:
    await fleet(store)
    await store.compact_counts()
    await conn.execute("UPDATE aiservice.job_finishes SET minute = minute - interval '2 hours'")
    stats = await store.stats()
    assert stats.completed_per_minute.last_60m == 0
    assert stats.errors_last_hour == [] and stats.errors[0].count == 5
    await conn.execute("UPDATE aiservice.job_finishes SET minute = minute - interval '9 days'")
    await store.compact_counts()
    assert await conn.fetchval("SELECT count(*) FROM aiservice.job_finishes") == 0


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
