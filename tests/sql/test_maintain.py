"""aiservice.maintain and its steps (schema/functions/maintain.sql): one pass shared by replicas, day
partitions of job_history made ahead, retention (purge_jobs) dropping whole days."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from conftest import JobFactory
from sqlapi import Conn, claim_tokens

from aiservice import errors
from aiservice.db.store import JobStore

# --- aiservice.maintain(): one pass of lease expiry, retention and counter folding that any process may run.


async def expired_lease(conn: Conn, job_factory: JobFactory) -> int:
    job = await job_factory()
    await conn.execute("SELECT * FROM aiservice.claim_jobs('w', 1)")
    await conn.execute("UPDATE aiservice.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1", job.id)
    return job.id


async def test_a_pass_runs_every_step_and_answers_what_it_did(conn: Conn, job_factory: JobFactory) -> None:
    job_id = await expired_lease(conn, job_factory)
    done = await conn.fetchval("SELECT aiservice.maintain(interval '30 days')")
    assert done["ran"] is True and done["errors"] == {}
    assert done["expire_leases"] == 1 and done["purge_jobs"] == 0 and done["compact_counts"] > 0
    assert await conn.fetchval("SELECT status FROM aiservice.all_jobs WHERE id = $1", job_id) == "pending"
    assert "purge_jobs" not in await conn.fetchval("SELECT aiservice.maintain()")  # no retention, no purge


async def test_replicas_share_one_pass_per_interval(conn: Conn, database_url: str) -> None:
    assert (await conn.fetchval("SELECT aiservice.maintain(NULL, interval '1 hour')"))["ran"] is True
    assert (await conn.fetchval("SELECT aiservice.maintain(NULL, interval '1 hour')"))["ran"] is False
    assert (await conn.fetchval("SELECT aiservice.maintain(NULL, interval '0')"))["ran"] is True


async def test_a_pass_in_progress_elsewhere_is_not_waited_for(conn: Conn, database_url: str) -> None:
    other = await asyncpg.connect(database_url)
    try:
        async with other.transaction():
            await other.execute("SELECT aiservice.maintain()")  # holds the pass until commit
            done = await conn.fetchval("SELECT aiservice.maintain()", timeout=5)
            assert done == {"ran": False}
    finally:
        await other.close()


# --- Live jobs apart from history: a finished job leaves aiservice.jobs for aiservice.job_history (partitioned by
# day), a retry brings it back, retention drops whole day partitions, and every read answers as if there were one
# table.


JOB = {"owner_service": "telephony", "task_type": "llm_chat", "model_profile": "qwen"}


async def new_jobs(conn: Conn, n: int, **fields: Any) -> list[int]:
    rows = await conn.fetch(
        "SELECT (j.job).id FROM aiservice.create_jobs($1, $2) j",
        [{"owner_ref": f"call/{i}"} | fields for i in range(n)],
        JOB,
    )
    return [r["id"] for r in rows]


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
    await complete(conn, await claim_tokens(conn))
    part = await conn.fetchval("SELECT tableoid::regclass::text FROM aiservice.job_history WHERE id = $1", job_id)
    assert part == f"aiservice.job_history_p{today:%Y%m%d}"


async def test_a_partition_made_late_takes_its_day_out_of_the_default_partition(conn: Conn) -> None:
    ids = await new_jobs(conn, 3)
    await complete(conn, await claim_tokens(conn))  # no partition yet: all three in the default partition
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
    await complete(conn, await claim_tokens(conn))
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
    await complete(conn, await claim_tokens(conn))
    assert await conn.fetchval("SELECT aiservice.purge_jobs(interval '1 hour')") == 0
    assert await where(conn, job_id) == "job_history"


# --- Retention: finished jobs past JOB_RETENTION are deleted, nothing else is.


async def finished_days_ago(conn: Conn, job_id: int, days: int) -> None:
    await conn.execute(
        "UPDATE aiservice.job_history SET finished_at = now() - make_interval(days => $2) WHERE id = $1", job_id, days
    )


async def fleet(store: JobStore, job_factory: JobFactory, conn: Conn) -> dict[str, int]:
    """One job in each state that matters, the finished ones 40 days old unless named recent."""
    ids = {
        name: (await job_factory(owner_ref=name)).id
        for name in ("done", "failed", "cancelled", "recent", "pending", "running")
    }
    claimed = {j.id for j in await store.claim_jobs("w", 10, lease_timeout=timedelta(minutes=5))}
    assert claimed == set(ids.values())
    await store.complete_job(ids["done"], "w", {"ok": True})
    await store.complete_job(ids["recent"], "w", {"ok": True})
    await store.fail_job(ids["failed"], "w", "invalid_input", "bad", retryable=False)
    await store.cancel_job(ids["cancelled"])
    await store.release_job(ids["pending"], "w")
    for name in ("done", "failed", "cancelled"):
        await finished_days_ago(conn, ids[name], 40)
    await finished_days_ago(conn, ids["recent"], 2)
    return ids


async def test_purge_deletes_only_old_finished_jobs(store: JobStore, job_factory: JobFactory, conn: Conn) -> None:
    ids = await fleet(store, job_factory, conn)
    assert await store.purge_jobs(timedelta(days=30), limit=2) == 2  # oldest first, bounded per call
    assert await store.purge_jobs(timedelta(days=30)) == 1
    assert await store.purge_jobs(timedelta(days=30)) == 0
    left = {r["owner_ref"] for r in await conn.fetch("SELECT owner_ref FROM aiservice.all_jobs")}
    assert left == {"recent", "pending", "running"}
    for name in ("done", "failed", "cancelled"):
        with pytest.raises(errors.NotFound):
            await store.get_job(ids[name])
    stats = await store.stats()
    assert {(s.status.value, s.count) for s in stats.by_status} == {("completed", 1), ("pending", 1), ("running", 1)}


async def sql_create(conn: Conn, owner_ref: str, depends_on: list[int] | None = None) -> int:
    job_id: int = await conn.fetchval(
        "SELECT (r.job).id FROM aiservice.create_job('telephony', $1, 'llm_chat', 'qwen2.5-14b', p_depends_on => $2) r",
        owner_ref,
        depends_on,
    )
    return job_id


async def test_purge_keeps_a_dependency_until_its_dependents_finish(
    store: JobStore, job_factory: JobFactory, conn: Conn
) -> None:
    done = (await job_factory(owner_ref="transcript")).id
    (claimed,) = await store.claim_jobs("w", 1, lease_timeout=timedelta(minutes=5))
    await store.complete_job(claimed.id, "w", {"text": "transcript"})
    await finished_days_ago(conn, done, 40)
    dependent = await sql_create(conn, "analysis", [done])

    assert await store.purge_jobs(timedelta(days=30)) == 0  # the analysis will read the transcript
    assert (await store.get_job(done)).status == "completed"
    (running,) = await store.claim_jobs("w", 1, lease_timeout=timedelta(minutes=5))
    assert running.id == dependent and running.dependencies is not None
    assert running.dependencies[0].result == {"text": "transcript"}
    assert await store.purge_jobs(timedelta(days=30)) == 0  # running: still kept
    await store.complete_job(dependent, "w", {"ok": True})
    assert await store.purge_jobs(timedelta(days=30)) == 1  # now nothing waits for it
    with pytest.raises(errors.NotFound):
        await store.get_job(done)


async def test_a_cancelled_dependency_is_kept_until_its_dependents_failed(store: JobStore, conn: Conn) -> None:
    cancelled = await sql_create(conn, "transcribe")
    blocked = await sql_create(conn, "analysis", [cancelled])
    await store.cancel_job(cancelled)
    await finished_days_ago(conn, cancelled, 40)
    # Retention before the dependency is resolved: it must stay.
    assert await store.purge_jobs(timedelta(days=30)) == 0
    # A maintenance pass resolves (the dependent fails), then purges: the dependency goes.
    done = await conn.fetchval("SELECT aiservice.maintain(interval '30 days')")
    failed = await store.get_job(blocked)
    assert (failed.status, failed.error_category) == ("failed", "dependency_failed")
    assert failed.error_message == f"dependency {cancelled} is cancelled"
    assert done["purge_jobs"] == 1


async def test_a_purged_job_takes_its_dependency_rows_along(store: JobStore, conn: Conn) -> None:
    first = await sql_create(conn, "first")
    second = await sql_create(conn, "second", [first])
    for job_id in (first, second):
        await store.cancel_job(job_id)
        await finished_days_ago(conn, job_id, 40)
    await conn.execute("SELECT aiservice.maintain()")
    assert await store.purge_jobs(timedelta(days=30)) == 2
    assert await conn.fetchval("SELECT count(*) FROM aiservice.job_dependencies") == 0
