"""Retention: finished jobs past JOB_RETENTION are deleted, nothing else is."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, TypeAlias

import asyncpg
import pytest
from conftest import ClientFactory, JobFactory
from stubs import wait_for

from aiservice import errors
from aiservice.db.migrate import load_migrations, migrate
from aiservice.db.pool import connect
from aiservice.db.store import JobStore
from aiservice.settings import Settings

Conn: TypeAlias = "asyncpg.Connection[Any]"


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


@pytest.mark.parametrize(
    ("older_than", "limit"), [(timedelta(0), 10), (timedelta(days=-1), 10), (timedelta(days=1), 0)]
)
async def test_purge_refuses_bad_arguments(store: JobStore, older_than: timedelta, limit: int) -> None:
    with pytest.raises(errors.InvalidArgument):
        await store.purge_jobs(older_than, limit=limit)


def test_retention_setting() -> None:
    assert Settings.from_env({}).job_retention == timedelta(days=30)
    assert Settings.from_env({"JOB_RETENTION": "168h"}).job_retention == timedelta(days=7)
    assert Settings.from_env({"JOB_RETENTION": "0"}).job_retention is None


async def test_the_api_maintenance_loop_applies_retention(
    api_factory: ClientFactory, store: JobStore, job_factory: JobFactory, conn: Conn
) -> None:
    ids = await fleet(store, job_factory, conn)
    await api_factory(maintenance_interval=timedelta(milliseconds=50), job_retention=timedelta(days=30))

    async def purged() -> bool:
        return bool(await conn.fetchval("SELECT count(*) FROM aiservice.all_jobs") == 3)

    await wait_for(purged, what="the maintenance loop to delete the old jobs")
    assert (await store.get_job(ids["recent"])).status == "completed"


async def test_retention_off_keeps_everything(
    api_factory: ClientFactory, store: JobStore, job_factory: JobFactory, conn: Conn
) -> None:
    await fleet(store, job_factory, conn)
    await api_factory(maintenance_interval=timedelta(milliseconds=50), job_retention=None)
    await asyncio.sleep(0.5)  # ten maintenance rounds
    assert await conn.fetchval("SELECT count(*) FROM aiservice.all_jobs") == 6


# --- retention and pipelines ---------------------------------------------------------


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


async def test_the_upgrade_fails_jobs_left_blocked_on_a_deleted_dependency(empty_database_url: str) -> None:
    """Before 0014 retention could delete a dependency its dependents still waited for; the upgrade
    fails them as resolving that dependency would have, and forgets deleted jobs' dependency rows."""
    conn = await connect(empty_database_url)
    try:
        await migrate(conn, [m for m in load_migrations() if m.name < "0014"], functions=[])
        await conn.execute(
            "INSERT INTO aiservice.jobs (id, owner_service, owner_ref, task_type, model_profile, status, blocked,"
            " scheduled) OVERRIDING SYSTEM VALUE VALUES"
            " (1, 's', 'stranded', 't', 'm', 'pending', true, true),"
            " (2, 's', 'waiting', 't', 'm', 'pending', true, true),"
            " (3, 's', 'running dependency', 't', 'm', 'pending', false, false)"
        )
        await conn.execute(
            "INSERT INTO aiservice.job_dependencies (job_id, position, depends_on)"
            " VALUES (1, 0, 3), (1, 1, 99), (2, 0, 3), (77, 0, 3)"  # 99 and 77 were deleted
        )
        await migrate(conn)
        rows = await conn.fetch(
            "SELECT id, status::text, blocked, error_category, error_message FROM aiservice.all_jobs ORDER BY id"
        )
        assert [tuple(r) for r in rows] == [
            (1, "failed", False, "dependency_failed", "dependency 99 no longer exists"),
            (2, "pending", True, None, None),
            (3, "pending", False, None, None),
        ]
        assert await conn.fetchval("SELECT count(*) FROM aiservice.job_dependencies WHERE job_id = 77") == 0
    finally:
        await conn.close()
