"""Retention: finished jobs past JOB_RETENTION are deleted, nothing else is: the setting, the store and
the API's maintenance loop. purge_jobs itself: tests/sql/test_maintain.py."""

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
