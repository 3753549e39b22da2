"""Result waits under load and under forged notifications: bounds (429 with Retry-After), one read for
many waiters, no pooled connection held while parked, and a listener that trusts only PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import JobFactory
from stubs import wait_for

from aiservice.api.app import create_app
from aiservice.api.handlers import WAITERS
from aiservice.db.pool import create_pool
from aiservice.db.store import JobStore
from aiservice.settings import Settings

API = "/api/v1"
LEASE = timedelta(minutes=5)


async def finish(store: JobStore, job_id: int) -> None:
    kind = await store.get_job(job_id)
    (job,) = await store.claim_jobs("w", 1, lease_timeout=LEASE, model_profiles=[kind.model_profile])
    assert job.id == job_id
    await store.complete_job(job_id, "w", {"ok": True})


class CountingStore(JobStore):
    """A JobStore that counts its calls into PostgreSQL."""

    calls = 0

    async def _fetch(self, function: str, args: dict[str, Any], select: str = "*") -> list[asyncpg.Record]:
        self.calls += 1
        return await super()._fetch(function, args, select)


@pytest.fixture
async def small_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, max_size=2, wait=5)
    yield pool
    await pool.close()


@pytest.fixture
async def client(settings: Settings, small_pool: asyncpg.Pool) -> AsyncIterator[TestClient[Any, Any]]:
    """The API on a pool of two connections, with a store that counts its calls."""
    app = create_app(replace(settings, db_pool_max_size=2), store=CountingStore(small_pool))
    api: TestClient[Any, Any] = TestClient(TestServer(app))
    await api.start_server()
    yield api
    await api.close()


async def parked(api: TestClient[Any, Any], n: int) -> None:
    waiters = api.server.app[WAITERS]

    async def all_parked() -> bool:
        return waiters.waiting == n

    await wait_for(all_parked, what=f"{n} waits to park")


async def test_waits_past_the_bounds_get_429_with_retry_after_at_once(
    api_factory: Any, job_factory: JobFactory, store: JobStore
) -> None:
    api = await api_factory(wait_max_per_caller=2, wait_max_concurrent=3)
    job = await job_factory()
    url = f"{api.server.scheme}://{api.server.host}:{api.server.port}{API}"
    held = [
        asyncio.create_task(api.get(f"{API}/jobs/{job.id}", params={"wait": "30"})),
        asyncio.create_task(api.post(f"{API}/jobs/wait", json={"ids": [job.id], "timeout": 30})),
    ]
    await parked(api, 2)

    # A third wait of the same caller (the client address, without a token): refused, not parked.
    for over in (
        api.get(f"{API}/jobs/{job.id}", params={"wait": "5"}),
        api.post(f"{API}/jobs/wait", json={"ids": [job.id], "timeout": 5}),
    ):
        refused = await over
        assert refused.status == 429, await refused.text()
        assert (await refused.json())["error"]["code"] == "too_many_waits"
        assert "WAIT_MAX_PER_CALLER" in (await refused.json())["error"]["message"]
        assert int(refused.headers["Retry-After"]) >= 1

    # Another address is another caller: one more fits the global bound of 3, the next does not.
    other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=other) as session:
        third = asyncio.create_task(session.get(f"{url}/jobs/{job.id}", params={"wait": "30"}))
        held.append(third)
        await parked(api, 3)
        async with session.get(f"{url}/jobs/{job.id}", params={"wait": "5"}) as response:
            assert response.status == 429
            assert "WAIT_MAX_CONCURRENT" in (await response.json())["error"]["message"]
            assert response.headers["Retry-After"]
        # A plain read is no wait: it answers.
        async with session.get(f"{url}/jobs/{job.id}") as response:
            assert response.status == 200

        # The parked waits are still answered, with the finished job.
        await finish(store, job.id)
        first, second, third_response = await asyncio.gather(*held)
        assert (await first.json())["status"] == "completed"
        assert [j["status"] for j in (await second.json())["jobs"]] == ["completed"]
        assert (await third_response.json())["status"] == "completed"
        third_response.release()
    assert api.server.app[WAITERS].waiting == 0
    # The slots are free again.
    assert (await api.get(f"{API}/jobs/{job.id}", params={"wait": "1"})).status == 200


async def test_many_waits_on_the_same_jobs_share_one_entry_per_id_and_hold_no_connection(
    client: TestClient[Any, Any], job_factory: JobFactory, store: JobStore, small_pool: asyncpg.Pool
) -> None:
    api = client
    waiters = api.server.app[WAITERS]
    counting = waiters.store
    assert isinstance(counting, CountingStore)
    jobs = [await job_factory() for _ in range(50)]
    ids = [j.id for j in jobs]

    first = asyncio.create_task(api.post(f"{API}/jobs/wait", json={"ids": ids, "timeout": 30}))
    await parked(api, 1)
    waiters.recheck = 3600.0  # from here on only new ids or notifications cause reads
    await asyncio.sleep(1.2)  # the run loop's current re-check interval ends
    before = counting.calls

    n = 40
    more = [
        asyncio.create_task(api.post(f"{API}/jobs/wait", json={"ids": ids, "timeout": 30, "mode": mode}))
        for mode in ("all", "any")
        for _ in range(n // 2)
    ]
    await parked(api, n + 1)
    # Ids already awaited and read are not read again for a new waiter, and each id has one entry.
    assert counting.calls == before
    assert waiters.awaited_ids == len(ids)
    # Parked waits hold no pooled connection: a plain request still gets one of the two at once.
    assert small_pool.get_idle_size() == small_pool.get_size()
    plain = await api.get(f"{API}/jobs/{ids[0]}")
    assert plain.status == 200

    await finish(store, ids[0])
    answers = await asyncio.gather(*more[n // 2 :])  # the "any" ones answer; the "all" ones still wait
    for answer in answers:
        assert answer.status == 200
        assert (await answer.json())["jobs"][0]["status"] == "completed"
    assert not any(t.done() for t in [first, *more[: n // 2]])
    await parked(api, n // 2 + 1)

    for job_id in ids[1:]:
        await finish(store, job_id)
    for answer in await asyncio.gather(first, *more[: n // 2]):
        assert {j["status"] for j in (await answer.json())["jobs"]} == {"completed"}
    assert waiters.waiting == 0 and waiters.awaited_ids == 0


async def test_a_wait_times_out_with_the_current_state_and_unknown_ids_are_404(
    client: TestClient[Any, Any], job_factory: JobFactory
) -> None:
    job = await job_factory()
    got = await client.post(f"{API}/jobs/wait", json={"ids": [job.id], "timeout": 0.3, "mode": "any"})
    assert [j["status"] for j in (await got.json())["jobs"]] == ["pending"]
    unknown = await client.post(f"{API}/jobs/wait", json={"ids": [job.id, 987654], "timeout": 5})
    assert unknown.status == 404 and "987654" in (await unknown.json())["error"]["message"]
    assert client.server.app[WAITERS].waiting == 0


async def test_a_forged_notification_does_not_answer_a_waiter(
    api_factory: Any, job_factory: JobFactory, store: JobStore, conn: asyncpg.Connection[Any]
) -> None:
    """Any role that may NOTIFY can claim a job finished: the waiter re-reads the job instead."""
    api = await api_factory()
    waiters = api.server.app[WAITERS]
    await wait_for(_connected(waiters), what="the waiters' listener")
    forged, witness = await job_factory(model_profile="forged"), await job_factory(model_profile="witness")
    waiting = asyncio.create_task(api.get(f"{API}/jobs/{forged.id}", params={"wait": "30"}))
    watching = asyncio.create_task(api.get(f"{API}/jobs/{witness.id}", params={"wait": "30"}))
    await parked(api, 2)
    waiters.recheck = 3600.0

    payload = f'{{"jobs": [{{"id": {forged.id}, "status": "completed", "owner_service": "telephony"}}]}}'
    await conn.execute("SELECT pg_notify('aiservice_finished', $1)", payload)
    # Notifications arrive in order: once the witness (really finished after) is answered, the
    # forged one has been heard and handled.
    await finish(store, witness.id)
    assert (await (await watching).json())["status"] == "completed"
    assert not waiting.done()

    await finish(store, forged.id)
    assert (await (await waiting).json())["status"] == "completed"


MALFORMED = [
    "not json",
    "[]",
    "null",
    '"a string"',
    "{}",
    '{"jobs": 5}',
    '{"jobs": "abc"}',
    '{"jobs": [null, 3, "x", {"id": "1"}, {"id": true}, {"id": -1}, {"id": 1.5}]}',
    '{"jobs": [{"id": 99999999999999999999999999999999999999}]}',
    '{"jobs": [{"id": 1e400}]}',
    '{"batch_id": "x"}',
    "[" * 3000 + "]" * 3000,
]


async def test_malformed_notifications_leave_the_listener_working(
    api_factory: Any,
    job_factory: JobFactory,
    store: JobStore,
    conn: asyncpg.Connection[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = await api_factory()
    waiters = api.server.app[WAITERS]
    await wait_for(_connected(waiters), what="the waiters' listener")
    job = await job_factory()
    waiting = asyncio.create_task(api.get(f"{API}/jobs/{job.id}", params={"wait": "30"}))
    await parked(api, 1)
    waiters.recheck = 3600.0

    caplog.set_level(logging.DEBUG)
    for payload in MALFORMED * 3:
        await conn.execute("SELECT pg_notify('aiservice_finished', $1)", payload)
    await finish(store, job.id)  # heard after all of them
    got = await asyncio.wait_for(waiting, 10)
    assert (await got.json())["status"] == "completed"
    assert waiters.connected

    # Told once (per logger) at warning level, the rest at debug; nothing at error level.
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("aiservice")]
    assert len(loud) <= 2, [r.getMessage() for r in loud]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def _connected(waiters: Any) -> Any:
    async def check() -> bool:
        return bool(waiters.connected)

    return check


def test_the_bounds_and_deadlines_are_settings_checked_at_start() -> None:
    from aiservice.settings import SettingsError

    read = Settings.from_env(
        {
            "WAIT_MAX_CONCURRENT": "10",
            "WAIT_MAX_PER_CALLER": "3",
            "HTTP_HEADER_TIMEOUT": "2s",
            "HTTP_MAX_CONNECTIONS": "5",
        }
    )
    assert (read.wait_max_concurrent, read.wait_max_per_caller, read.http_max_connections) == (10, 3, 5)
    assert read.http_header_timeout == timedelta(seconds=2)
    for name, value in [
        ("WAIT_MAX_PER_CALLER", "0"),
        ("WAIT_MAX_CONCURRENT", "many"),
        ("HTTP_BODY_TIMEOUT", "0"),
        ("HTTP_IDLE_TIMEOUT", "soon"),
        ("HTTP_MAX_CONNECTIONS", "-1"),
    ]:
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: value})
