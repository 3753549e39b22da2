"""Live jobs apart from history: a finished job leaves aiservice.jobs for aiservice.job_history
(partitioned by day), a retry brings it back, retention drops whole day partitions, and every
read answers as if there were one table."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import asyncpg
import pytest

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


async def test_every_way_of_finishing_moves_the_job_and_a_retry_brings_it_back(conn: Conn) -> None:
    done, failed, cancelled, expired, waiting = await new_jobs(conn, 5, max_attempts=1)
    claimed = {r["id"]: r for r in await claim(conn)}
    assert set(claimed) == {done, failed, cancelled, expired, waiting}
    await conn.execute("SELECT 1 FROM aiservice.release_job($1, 'w')", waiting)
    assert await complete(conn, [claimed[done]]) == ["completed"]
    await conn.execute(
        "SELECT 1 FROM aiservice.fail_job($1, 'w', 'invalid_input', 'bad', p_retryable => false)", failed
    )
    await conn.execute("SELECT 1 FROM aiservice.cancel_job($1)", cancelled)
    await conn.execute(
        "UPDATE aiservice.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1", expired
    )
    assert await conn.fetchval("SELECT count(*) FROM aiservice.expire_leases()") == 1

    assert [await where(conn, i) for i in (done, failed, cancelled, expired)] == ["job_history"] * 4
    assert await where(conn, waiting) == "jobs"
    statuses = {r["id"]: (r["status"], r["error_category"]) for r in await conn.fetch(
        "SELECT id, status::text, error_category FROM aiservice.all_jobs")}  # fmt: skip
    assert statuses == {
        done: ("completed", None),
        failed: ("failed", "invalid_input"),
        cancelled: ("cancelled", None),
        expired: ("failed", "lease_expired"),
        waiting: ("pending", "worker_shutdown"),
    }
    got = await conn.fetchrow("SELECT * FROM aiservice.get_job($1)", done)
    assert got["result"] == {"text": f"result {done}", "usage": {"total_tokens": 7}}
    assert got["finished_at"] is not None and got["lease_token"] is None

    assert await conn.fetchval("SELECT count(*) FROM aiservice.retry_jobs(p_ids => $1)", [failed, expired]) == 2
    assert [await where(conn, i) for i in (failed, expired)] == ["jobs", "jobs"]
    back = await conn.fetchrow("SELECT * FROM aiservice.get_job($1)", failed)
    assert (back["status"], back["attempts"], back["finished_at"], back["error_category"]) == ("pending", 0, None, None)


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


async def test_the_live_table_refuses_a_finished_row(conn: Conn) -> None:
    (job_id,) = await new_jobs(conn, 1)
    with pytest.raises(asyncpg.CheckViolationError, match="jobs_live_check"):
        await conn.execute("UPDATE aiservice.jobs SET status = 'cancelled', finished_at = now() WHERE id = $1", job_id)


async def test_a_finished_job_answers_as_finished_to_its_worker_and_to_cancel(conn: Conn) -> None:
    (job_id,) = await new_jobs(conn, 1)
    (claimed,) = await claim(conn)
    assert await complete(conn, [claimed]) == ["completed"]
    assert await complete(conn, [claimed]) == ["lease_lost"]  # not "not_found": it exists, finished
    with pytest.raises(asyncpg.PostgresError) as lost:
        await conn.execute("SELECT 1 FROM aiservice.heartbeat_job($1, 'w')", job_id)
    assert lost.value.sqlstate == "AS410"
    with pytest.raises(asyncpg.PostgresError) as refused:
        await conn.execute("SELECT 1 FROM aiservice.cancel_job($1)", job_id)
    assert refused.value.sqlstate == "AS409"
    with pytest.raises(asyncpg.PostgresError) as missing:
        await conn.execute("SELECT 1 FROM aiservice.cancel_job($1)", job_id + 1000)
    assert missing.value.sqlstate == "AS404"


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


async def test_a_list_pages_through_live_and_finished_jobs_in_id_order(conn: Conn) -> None:
    ids = await new_jobs(conn, 6)
    claimed = await claim(conn, 3)
    await complete(conn, claimed)
    page = "SELECT id FROM aiservice.list_jobs(p_owner_service => 'telephony', p_before_id => $1, p_limit => 4)"
    first = [r["id"] for r in await conn.fetch(page, None)]
    second = [r["id"] for r in await conn.fetch(page, first[-1])]
    assert first + second == sorted(ids, reverse=True)
