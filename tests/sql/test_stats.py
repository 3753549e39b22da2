"""aiservice.stats and compact_counts (schema/functions/stats.sql): counters equal to a full recount."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from sqlapi import Conn, call, claim, create, q, refused_statement, running

from aiservice.db.store import JobStore
from aiservice.jobs import JobCreate


async def _fleet(conn: Conn) -> dict[str, int]:
    """Jobs of two owners, three kinds and every status; returns ids by name."""
    ids: dict[str, int] = {}
    specs = {
        "tel_chat": {"owner_ref": "call/1"},
        "tel_chat2": {"owner_ref": "call/2"},
        "tel_whisper": {"owner_ref": "call/1", "task_type": "transcribe", "model_profile": "whisperx"},
        "tg_chat": {"owner_service": "monitoring-tg", "owner_ref": "channel/1"},
        "tg_vision": {"owner_service": "monitoring-tg", "owner_ref": "channel/2", "model_profile": "vision"},
    }
    for name, spec in specs.items():
        ids[name] = (await create(conn, **spec))["id"]
    # tel_chat completed, tg_chat failed, tg_vision cancelled, tel_whisper running, tel_chat2 pending
    (c,) = await call(
        conn, "claim_jobs", worker_id="w", limit=1, task_types=["llm_chat"], model_profiles=["qwen2.5-14b"]
    )
    assert c["id"] == ids["tel_chat"]
    await call(conn, "complete_job", id=c["id"], worker_id="w", result={})
    await conn.execute("UPDATE aiservice.jobs SET priority = 1 WHERE id = $1", ids["tg_chat"])
    (f,) = await claim(conn, "w")
    assert f["id"] == ids["tg_chat"]
    await call(conn, "fail_job", id=f["id"], worker_id="w", error_category="bad_input")
    await call(conn, "cancel_job", id=ids["tg_vision"])
    (r,) = await call(conn, "claim_jobs", worker_id="w", task_types=["transcribe"])
    assert r["id"] == ids["tel_whisper"]
    return ids


async def test_stats(conn: Conn) -> None:
    assert await conn.fetchval("SELECT aiservice.stats()") == {
        "window_seconds": 3600,
        "totals": {"pending": 0, "running": 0, "completed": 0, "failed": 0, "cancelled": 0},
        "by_status": [],
        "created": [],
        "errors": [],
        "errors_last_hour": [],
        "oldest_pending_age_seconds": None,
        "oldest_pending": [],
        "completed_per_minute": {"last_5m": 0, "last_60m": 0},
        "latency": [],
        "running_by_worker": [],
        "limits": [],
        "per_minute": [],
    }
    await _fleet(conn)
    await create(conn, owner_ref="old", run_at=datetime.now(UTC) - timedelta(hours=1))
    await create(conn, owner_ref="future", run_at=datetime.now(UTC) + timedelta(hours=2))
    job = await running(conn, task_type="transcribe", model_profile="whisperx")
    await call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="bad_input")
    job = await running(conn, task_type="transcribe", model_profile="whisperx")
    await call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="bad_input")
    job = await running(conn, max_attempts=1)
    await call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="timeout")
    job = await running(conn)
    await call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="rate_limited")  # pending again

    stats = await conn.fetchval("SELECT aiservice.stats()")
    counts = {(s["status"], s["task_type"], s["model_profile"]): s["count"] for s in stats["by_status"]}
    assert counts == {
        ("completed", "llm_chat", "qwen2.5-14b"): 1,
        ("failed", "llm_chat", "qwen2.5-14b"): 2,
        ("failed", "transcribe", "whisperx"): 2,
        ("cancelled", "llm_chat", "vision"): 1,
        ("running", "transcribe", "whisperx"): 1,
        ("pending", "llm_chat", "qwen2.5-14b"): 4,
    }
    assert stats["errors"] == [
        {"error_category": "bad_input", "count": 3},
        {"error_category": "timeout", "count": 1},
    ]
    age = stats["oldest_pending_age_seconds"]
    assert 3600 <= age < 3600 + 600


# --- Statistics kept by counters: equal to a full recount, before and after compaction.


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


# --- A caller reaching PostgreSQL directly through the SQL API cannot corrupt state.

CHECK = "23514"


async def test_a_bad_row_cannot_break_stats_for_everyone(conn: Conn) -> None:
    """Before 0004, one job due at '-infinity' made aiservice.stats() fail for every caller."""
    await refused_statement(conn, CHECK, "SELECT * FROM aiservice.create_job('s', 'r', 't', 'm', '{}', 0, '-infinity')")
    await conn.fetch(q("SELECT * FROM aiservice.create_job('s', 'r', 't', 'm')"))
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("UPDATE aiservice.jobs SET run_at = '-infinity'")  # even a direct UPDATE
    stats = await conn.fetchval("SELECT aiservice.stats()")
    assert stats["oldest_pending_age_seconds"] is not None
