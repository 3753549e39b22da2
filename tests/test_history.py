"""Live jobs apart from history: a finished job leaves aiservice.jobs for aiservice.job_history
(partitioned by day), a retry brings it back, retention drops whole day partitions, and every
read answers as if there were one table."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import asyncpg

Conn: TypeAlias = "asyncpg.Connection[Any]"

JOB = {"owner_service": "telephony", "task_type": "llm_chat", "model_profile": "qwen"}


async def new_jobs(conn: Conn, n: int, **fields: Any) -> list[int]:
    rows = await conn.fetch(
        "SELECT (j.job).id FROM aiservice.create_jobs($1, $2) j",
        [{"owner_ref": f"call/{i}"} | fields for i in range(n)],
        JOB,
    )
    return [r["id"] for r in rows]


async def claim(conn: Conn, limit: int = 10) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT id, lease_token FROM aiservice.claim_jobs('w', $1)", limit)


async def where(conn: Conn, job_id: int) -> str:
    """The table a job's row is in: 'jobs', 'job_history', or '' (none)."""
    live = await conn.fetchval("SELECT count(*) FROM aiservice.jobs WHERE id = $1", job_id)
    done = await conn.fetchval("SELECT count(*) FROM aiservice.job_history WHERE id = $1", job_id)
    assert live + done <= 1, f"job {job_id} is in both tables"
    return "jobs" if live else "job_history" if done else ""


async def complete(conn: Conn, claimed: list[asyncpg.Record]) -> list[str]:
    rows = await conn.fetch(
        "SELECT outcome FROM aiservice.complete_jobs('w', $1, $2, $3)",
        [r["id"] for r in claimed],
        [{"text": f"result {r['id']}", "usage": {"total_tokens": 7}} for r in claimed],
        [r["lease_token"] for r in claimed],
    )
    return [r["outcome"] for r in rows]


async def test_counts_and_batch_counts_follow_the_moves(conn: Conn) -> None:
    ids = await new_jobs(conn, 4, max_attempts=1)
    batch = await conn.fetchval("SELECT batch_id FROM aiservice.jobs WHERE id = $1", ids[0])
    claimed = await claim(conn)
    await complete(conn, claimed[:2])
    await conn.execute("SELECT 1 FROM aiservice.fail_job($1, 'w', 'invalid_input', p_retryable => false)", ids[2])
    await conn.execute("SELECT 1 FROM aiservice.retry_job($1)", ids[2])
    await conn.execute("SELECT 1 FROM aiservice.cancel_job($1)", ids[3])
    counts = json.loads(await conn.fetchval("SELECT aiservice.get_batch($1)::text", batch))["counts"]
    assert counts == {"total": 4, "pending": 1, "running": 0, "completed": 2, "failed": 0, "cancelled": 1}
    stats = json.loads(await conn.fetchval("SELECT aiservice.stats()::text"))
    assert {k: v for k, v in stats["totals"].items() if v} == {"pending": 1, "completed": 2, "cancelled": 1}
    assert stats["created"] == [
        {"task_type": "llm_chat", "model_profile": "qwen", "count": 4}
    ]  # a retry is no creation


async def test_maintain_makes_day_partitions_ahead_and_finished_jobs_land_in_today(conn: Conn) -> None:
    done = await conn.fetchval("SELECT aiservice.maintain()")
    assert done["prepare_history"] == 3 and done["errors"] == {}
    today = await conn.fetchval("SELECT (now() AT TIME ZONE 'UTC')::date")
    names = {r[0] for r in await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'aiservice.job_history'::regclass")}  # fmt: skip
    assert names == {"job_history_default"} | {f"job_history_p{(today + timedelta(days=d)):%Y%m%d}" for d in range(3)}
    assert (await conn.fetchval("SELECT aiservice.maintain()"))["prepare_history"] == 0
    (job_id,) = await new_jobs(conn, 1)
    await complete(conn, await claim(conn))
    part = await conn.fetchval("SELECT tableoid::regclass::text FROM aiservice.job_history WHERE id = $1", job_id)
    assert part == f"aiservice.job_history_p{today:%Y%m%d}"


async def test_a_partition_made_late_takes_its_day_out_of_the_default_partition(conn: Conn) -> None:
    ids = await new_jobs(conn, 3)
    await complete(conn, await claim(conn))  # no partition yet: all three in the default partition
    assert await conn.fetchval("SELECT count(*) FROM aiservice.job_history_default") == 3
    assert await conn.fetchval("SELECT aiservice.prepare_history(0)") == 1
    assert await conn.fetchval("SELECT count(*) FROM aiservice.job_history_default") == 0
    assert sorted(r[0] for r in await conn.fetch("SELECT id FROM aiservice.job_history")) == ids
    stats = json.loads(await conn.fetchval("SELECT aiservice.stats()::text"))
    assert stats["totals"]["completed"] == 3  # a move between partitions is no count


async def test_retention_drops_whole_days_and_keeps_what_live_jobs_depend_on(conn: Conn) -> None:
    old_day = datetime.now(UTC).date() - timedelta(days=40)
    await conn.execute("SELECT aiservice.make_history_partition($1)", old_day)
    keyed, plain, needed = await new_jobs(conn, 3)
    await conn.execute("UPDATE aiservice.jobs SET idempotency_key = NULL WHERE id <> $1", keyed)
    await conn.execute(
        "INSERT INTO aiservice.job_keys (owner_service, idempotency_key, job_id) VALUES ('telephony', 'old', $1)", keyed
    )
    await conn.execute("UPDATE aiservice.jobs SET idempotency_key = 'old' WHERE id = $1", keyed)
    await complete(conn, await claim(conn))
    waiting = (await conn.fetchrow(
        "SELECT (r.job).id FROM aiservice.create_job('telephony', 'next', 'llm_chat', 'qwen', p_depends_on => $1, "
        "p_run_at => now() + interval '1 day') r", [needed]))["id"]  # fmt: skip
    await conn.execute(
        "UPDATE aiservice.job_history SET finished_at = $2::date + interval '12 hours' WHERE id = ANY ($1)",
        [keyed, plain, needed],
        old_day,
    )
    await conn.execute("SELECT aiservice.compact_counts()")
    assert await conn.fetchval("SELECT aiservice.purge_jobs(interval '30 days')") == 2
    assert await conn.fetchval("SELECT to_regclass($1)", f"aiservice.job_history_p{old_day:%Y%m%d}") is None
    assert [await where(conn, i) for i in (keyed, plain, needed, waiting)] == ["", "", "job_history", "jobs"]
    assert await conn.fetchval("SELECT tableoid::regclass::text FROM aiservice.job_history WHERE id = $1", needed) == (
        "aiservice.job_history_default"
    )
    assert await conn.fetchval("SELECT count(*) FROM aiservice.job_keys WHERE job_id = $1", keyed) == 0
    stats = json.loads(await conn.fetchval("SELECT aiservice.stats()::text"))
    assert stats["totals"]["completed"] == 1 and stats["totals"]["pending"] == 1
    # The dependent finishes; the kept dependency goes the next time, row by row.
    await conn.execute("SELECT 1 FROM aiservice.cancel_job($1)", waiting)
    assert await conn.fetchval("SELECT aiservice.purge_jobs(interval '30 days')") == 1
    assert await where(conn, needed) == ""
    assert await conn.fetchval("SELECT count(*) FROM aiservice.job_dependencies") == 1  # the cancelled job's own


async def test_retention_keeps_a_day_that_has_not_ended_before_the_cutoff(conn: Conn) -> None:
    await conn.execute("SELECT aiservice.prepare_history(0)")
    (job_id,) = await new_jobs(conn, 1)
    await complete(conn, await claim(conn))
    assert await conn.fetchval("SELECT aiservice.purge_jobs(interval '1 hour')") == 0
    assert await where(conn, job_id) == "job_history"
