"""A deadlock or serialization failure that still happens (a caller of the SQL API holding locks in
another order) is retried by JobStore and, when it persists, answered 503 with its reason, never 500."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from stubs import wait_for

from aiservice.api.app import create_app
from aiservice.db.pool import connect, create_pool
from aiservice.db.store import JobStore
from aiservice.settings import Settings

Conn: TypeAlias = "asyncpg.Connection[Any]"
Client = TestClient[Any, Any]
API = "/api/v1"


API_BACKEND = "aiservice-api-under-test"


@pytest.fixture
async def client_with(
    settings: Settings, conn: Conn, database_url: str
) -> AsyncIterator[Callable[[int], Awaitable[Client]]]:
    """An API whose store makes ``retries`` more attempts after a deadlock. Its connections look for
    deadlocks after 3 s (the other session of these tests after 60 s), so that the API's backend is
    the one that finds the cycle, however slow the machine."""
    await conn.execute(
        f"ALTER DATABASE \"{await conn.fetchval('SELECT current_database()')}\" SET deadlock_timeout = '3s'"
    )
    pool = await create_pool(database_url, max_size=2, application_name=API_BACKEND)
    clients: list[Client] = []

    async def make(retries: int) -> Client:
        client: Client = TestClient(TestServer(create_app(settings, store=JobStore(pool, contention_retries=retries))))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()
    await pool.close()


async def deadlocked_fail(api: Client, conn: Conn, database_url: str) -> tuple[int, dict[str, Any], int]:
    """POST /jobs/{id}/fail rate_limited while another session takes the same two rows the other way round.

    fail_job locks the job, then the profile's limit row (the cool-down). The other session holds
    the limit row; once the API's backend holds the job and waits for the limit, the other session
    asks for the job: a cycle. The API's backend, waiting longer and with the shorter
    deadlock_timeout, finds it and is rolled back; the other session then rolls back too.
    Returns the answer's status and body, and the job's id."""
    job_id = await conn.fetchval("SELECT (r.job).id FROM aiservice.create_job('s', 'r', 't', 'contended') r")
    token = await conn.fetchval("SELECT lease_token FROM aiservice.claim_jobs('w1', 1, ARRAY['t'])")
    await conn.execute("SELECT 1 FROM aiservice.set_limit('model_profile', 'contended', '{}')")
    holder = await connect(database_url)
    try:
        held = holder.transaction()
        await held.start()
        await holder.execute("SET LOCAL deadlock_timeout = '60s'")
        await holder.execute("SELECT 1 FROM aiservice.limits WHERE name = 'contended' FOR UPDATE")
        body = {"worker_id": "w1", "error_category": "rate_limited", "retry_after": 30, "lease_token": str(token)}
        request = asyncio.ensure_future(api.post(f"{API}/jobs/{job_id}/fail", json=body))
        await _api_waits_for_a_lock(conn)  # it holds the job and waits for the limit row
        await holder.execute("SELECT 1 FROM aiservice.jobs WHERE id = $1 FOR UPDATE", job_id)  # the cycle
        await held.rollback()
        async with asyncio.timeout(30):
            response = await request
        return response.status, await response.json(), job_id
    finally:
        await holder.close()


async def _api_waits_for_a_lock(conn: Conn) -> None:
    async def waits() -> bool:
        return bool(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
                API_BACKEND,
            )
        )

    await wait_for(waits, what="the API's backend to wait for a lock")


async def test_a_deadlock_that_persists_is_503_with_its_reason(
    client_with: Callable[[int], Awaitable[Client]], conn: Conn, database_url: str
) -> None:
    status, body, job_id = await deadlocked_fail(await client_with(0), conn, database_url)
    assert status == 503, body
    assert body["error"]["code"] == "contention"
    assert "deadlock" in body["error"]["message"]
    # Rolled back: the job still runs, and no cool-down began.
    assert await conn.fetchval("SELECT status::text FROM aiservice.all_jobs WHERE id = $1", job_id) == "running"
    assert await conn.fetchval("SELECT cooldown_until FROM aiservice.limits WHERE name = 'contended'") is None


async def test_a_deadlock_is_retried_by_the_store(
    client_with: Callable[[int], Awaitable[Client]], conn: Conn, database_url: str
) -> None:
    status, body, job_id = await deadlocked_fail(await client_with(2), conn, database_url)
    assert status == 200, body
    assert (body["id"], body["status"], body["error_category"]) == (job_id, "pending", "rate_limited")
    assert await conn.fetchval("SELECT cooldown_until FROM aiservice.limits WHERE name = 'contended'") is not None
