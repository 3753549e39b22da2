"""The maintenance loop in Python around aiservice.maintain(): a failing step logged under its name,
retention from the settings. maintain() itself: tests/sql/test_maintain.py."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, TypeAlias

import asyncpg
import pytest
from conftest import JobFactory

from aiservice.db.store import JobStore
from aiservice.maintenance import run_pass
from aiservice.settings import Settings

Conn: TypeAlias = "asyncpg.Connection[Any]"


async def expired_lease(conn: Conn, job_factory: JobFactory) -> int:
    job = await job_factory()
    await conn.execute("SELECT * FROM aiservice.claim_jobs('w', 1)")
    await conn.execute("UPDATE aiservice.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1", job.id)
    return job.id


async def test_a_failing_step_is_logged_under_its_name_and_the_others_still_run(
    conn: Conn, store: JobStore, settings: Settings, job_factory: JobFactory, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = await expired_lease(conn, job_factory)
    await conn.execute("ALTER TABLE aiservice.job_finishes RENAME TO job_finishes_gone")
    with caplog.at_level(logging.INFO, logger="aiservice.maintenance"):
        done = await run_pass(store, settings)
    assert "job_finishes" in done["errors"]["compact_counts"]  # type: ignore[index]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        f"maintenance step compact_counts failed: {done['errors']['compact_counts']}"  # type: ignore[index]
    ]
    assert await conn.fetchval("SELECT status FROM aiservice.all_jobs WHERE id = $1", job_id) == "pending"


async def test_retention_from_settings_reaches_the_pass(conn: Conn, store: JobStore, job_factory: JobFactory) -> None:
    job = await job_factory()
    await conn.execute("SELECT FROM aiservice.cancel_job($1)", job.id)
    await conn.execute("UPDATE aiservice.job_history SET finished_at = now() - interval '40 d' WHERE id = $1", job.id)
    done = await run_pass(store, Settings(database_url="x", job_retention=timedelta(days=30)))
    assert done["purge_jobs"] == 1
