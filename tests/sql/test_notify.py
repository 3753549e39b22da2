"""NOTIFY on channel aiservice_jobs (schema/functions/notify.sql and the triggers that call it)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from sqlapi import JOB, Conn, call, select

from aiservice.db.pool import connect

# --- NOTIFY on channel aiservice_jobs, seen by a second connection the way a worker listens.
#
# Notifications are delivered in commit order, so after each action the test sends a marker on the same channel and
# collects everything that arrived before it: counts are exact, with no sleeps.


CHANNEL = "aiservice_jobs"


class Listener:
    """Collects the JSON payloads of one channel; `since_last(conn)` returns what arrived since."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.markers: set[int] = set()
        self.changed = asyncio.Event()
        self.next_marker = 0

    def on_notify(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        assert channel == CHANNEL
        event = json.loads(payload)
        if event.get("event") == "test_marker":
            self.markers.add(event["n"])
        else:
            self.events.append(event)
        self.changed.set()

    async def since_last(self, sender: Conn) -> list[dict[str, Any]]:
        self.next_marker += 1
        n = self.next_marker
        await sender.execute("SELECT pg_notify($1, $2)", CHANNEL, json.dumps({"event": "test_marker", "n": n}))
        async with asyncio.timeout(10):
            while n not in self.markers:
                self.changed.clear()
                await self.changed.wait()
        events, self.events = self.events, []
        return events


@pytest.fixture
async def listener(database_url: str) -> AsyncIterator[Listener]:
    conn = await connect(database_url)
    heard = Listener()
    await conn.add_listener(CHANNEL, heard.on_notify)
    yield heard
    await conn.close()


async def create(conn: Conn, **args: Any) -> asyncpg.Record:
    (row,) = await select(conn, "create_job", JOB | args, "(r.job).*, r.created")
    return row


async def running(conn: Conn, worker: str = "w1", **args: Any) -> asyncpg.Record:
    job = await create(conn, **({"priority": 1000} | args))
    (claimed,) = await call(conn, "claim_jobs", worker_id=worker, limit=1)
    assert claimed["id"] == job["id"]
    return claimed


def pending(task_type: str = "llm_chat", model_profile: str = "qwen2.5-14b", run_at: Any = None) -> dict[str, Any]:
    return {"event": "pending", "task_type": task_type, "model_profile": model_profile, "run_at": run_at}


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def test_single_create_sends_one_pending_event(conn: Conn, listener: Listener) -> None:
    await create(conn)
    assert await listener.since_last(conn) == [pending()]


async def test_create_due_later_carries_run_at_and_a_repeat_sends_nothing(conn: Conn, listener: Listener) -> None:
    later = datetime(2099, 1, 1, 12, tzinfo=UTC)
    await create(conn, run_at=later, task_type="transcribe", model_profile="whisperx")
    (event,) = await listener.since_last(conn)
    assert event | {"run_at": None} == pending("transcribe", "whisperx")
    assert at(event["run_at"]) == later
    # an idempotent repeat creates nothing, so it sends nothing
    await create(conn, idempotency_key="k")
    assert len(await listener.since_last(conn)) == 1
    again = await create(conn, idempotency_key="k")
    assert again["created"] is False
    assert await listener.since_last(conn) == []


async def test_batch_of_10000_sends_one_notification(conn: Conn, listener: Listener) -> None:
    jobs = [{"owner_ref": f"call/{i}", "input": {"n": i}} for i in range(10_000)]
    rows = await select(conn, "create_jobs", {"jobs": jobs, "defaults": JOB}, "r.created")
    assert len(rows) == 10_000 and all(r["created"] for r in rows)
    assert await listener.since_last(conn) == [pending()]


async def test_batch_of_10000_sends_one_notification_per_kind(conn: Conn, listener: Listener) -> None:
    kinds = [("llm_chat", "qwen2.5-14b"), ("transcribe", "whisperx"), ("llm_chat", "vision")]
    later = datetime(2099, 3, 1, tzinfo=UTC)
    jobs: list[dict[str, Any]] = []
    for i in range(10_000):
        task_type, model_profile = kinds[i % 3]
        job = {"owner_ref": f"r/{i}", "task_type": task_type, "model_profile": model_profile}
        if model_profile == "vision":
            job["run_at"] = (later + timedelta(minutes=i)).isoformat()  # every vision job is due later
        jobs.append(job)
    rows = await select(conn, "create_jobs", {"jobs": jobs, "defaults": JOB}, "r.created")
    assert len(rows) == 10_000
    events = await listener.since_last(conn)
    assert len(events) == 3
    by_kind = {(e["task_type"], e["model_profile"]): e for e in events}
    assert set(by_kind) == set(kinds)
    assert by_kind["llm_chat", "qwen2.5-14b"] == pending()
    assert by_kind["transcribe", "whisperx"] == pending("transcribe", "whisperx")
    vision = by_kind["llm_chat", "vision"]
    assert at(vision["run_at"]) == later + timedelta(minutes=2)  # the earliest of them


async def test_batch_of_repeats_sends_nothing(conn: Conn, listener: Listener) -> None:
    jobs = [{"owner_ref": str(i), "idempotency_key": f"k{i}"} for i in range(100)]
    await select(conn, "create_jobs", {"jobs": jobs, "defaults": JOB}, "r.created")
    assert len(await listener.since_last(conn)) == 1
    rows = await select(conn, "create_jobs", {"jobs": jobs, "defaults": JOB}, "r.created")
    assert not any(r["created"] for r in rows)
    assert await listener.since_last(conn) == []


async def test_claim_complete_and_terminal_fail_send_nothing(conn: Conn, listener: Listener) -> None:
    job = await running(conn)
    await call(conn, "heartbeat_job", id=job["id"], worker_id="w1")
    await call(conn, "complete_job", id=job["id"], worker_id="w1", result={})
    job = await running(conn)
    await call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="bad_input")
    assert await listener.since_last(conn) == [pending(), pending()]  # the two creates only


async def test_retry_of_failed_jobs_sends_pending(conn: Conn, listener: Listener) -> None:
    job = await running(conn, max_attempts=1)
    await call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="bad_input")
    await listener.since_last(conn)
    await call(conn, "retry_job", id=job["id"])
    assert await listener.since_last(conn) == [pending()]
    await call(conn, "cancel_job", id=job["id"])
    # retry by filter: one event per kind of job
    for i in range(5):
        job = await running(conn, owner_ref=str(i), task_type="transcribe", model_profile="whisperx", max_attempts=1)
        await call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="bad_input")
    await listener.since_last(conn)
    assert len(await call(conn, "retry_jobs", task_type="transcribe")) == 5
    assert await listener.since_last(conn) == [pending("transcribe", "whisperx")]


async def test_retry_of_a_running_job_tells_its_worker_to_abort(conn: Conn, listener: Listener) -> None:
    job = await running(conn, "gpu-1")
    await listener.since_last(conn)
    await call(conn, "retry_job", id=job["id"])
    events = await listener.since_last(conn)
    assert sorted(events, key=lambda e: e["event"]) == [
        {"event": "abort", "id": job["id"], "worker_id": "gpu-1", "status": "pending"},
        pending(),
    ]


async def test_fail_with_backoff_sends_pending_with_run_at(conn: Conn, listener: Listener) -> None:
    job = await running(conn, task_type="call_analysis")
    await listener.since_last(conn)
    retry = (await call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="timeout"))[0]
    assert retry["status"] == "pending"
    (event,) = await listener.since_last(conn)  # and no abort: the worker gave the job back itself
    assert event | {"run_at": None} == pending("call_analysis")
    assert at(event["run_at"]) == retry["run_at"]


async def test_release_and_fail_due_now_send_pending_without_abort(conn: Conn, listener: Listener) -> None:
    job = await running(conn)
    await listener.since_last(conn)
    await call(conn, "release_job", id=job["id"], worker_id="w1")
    assert await listener.since_last(conn) == [pending()]
    await call(conn, "cancel_job", id=job["id"])
    job = await running(conn)
    await listener.since_last(conn)
    await call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="rate_limited", retry_after=timedelta(0))
    assert await listener.since_last(conn) == [pending()]


async def test_lease_expiry_sends_pending_and_abort(conn: Conn, listener: Listener) -> None:
    job = await running(conn, "gpu-2", model_profile="whisperx", task_type="transcribe")
    await conn.execute("UPDATE aiservice.jobs SET lease_expires_at = now() - interval '1 second'")
    await listener.since_last(conn)
    (expired,) = await call(conn, "expire_leases")
    assert expired["status"] == "pending"
    events = await listener.since_last(conn)
    assert sorted(events, key=lambda e: e["event"]) == [
        {"event": "abort", "id": job["id"], "worker_id": "gpu-2", "status": "pending"},
        pending("transcribe", "whisperx"),
    ]


async def test_lease_expiry_during_claim_sends_pending(conn: Conn, listener: Listener) -> None:
    job = await running(conn, "gpu-2")
    await conn.execute("UPDATE aiservice.jobs SET lease_expires_at = now() - interval '1 second'")
    await listener.since_last(conn)
    (again,) = await call(conn, "claim_jobs", worker_id="gpu-3", limit=1)
    assert again["id"] == job["id"]
    events = await listener.since_last(conn)
    assert pending() in events
    assert {"event": "abort", "id": job["id"], "worker_id": "gpu-2", "status": "pending"} in events


async def test_cancelling_a_running_job_sends_abort(conn: Conn, listener: Listener) -> None:
    job = await running(conn, "gpu-7")
    waiting = await create(conn)
    await listener.since_last(conn)
    await call(conn, "cancel_job", id=job["id"])
    assert await listener.since_last(conn) == [
        {"event": "abort", "id": job["id"], "worker_id": "gpu-7", "status": "cancelled"}
    ]
    await call(conn, "cancel_job", id=waiting["id"])  # a pending job has no worker to tell
    assert await listener.since_last(conn) == []


async def test_cancel_jobs_sends_one_abort_per_running_job(conn: Conn, listener: Listener) -> None:
    jobs = [await running(conn, f"gpu-{i}", owner_ref=f"r{i}") for i in range(3)]
    await create(conn)
    await listener.since_last(conn)
    assert len(await call(conn, "cancel_jobs", owner_service="telephony")) == 4
    events = await listener.since_last(conn)
    assert sorted(events, key=lambda e: e["id"]) == [
        {"event": "abort", "id": j["id"], "worker_id": j["worker_id"], "status": "cancelled"} for j in jobs
    ]


async def test_cancelling_a_job_that_was_released_before_still_sends_abort(conn: Conn, listener: Listener) -> None:
    # A release leaves error_category 'worker_shutdown'; the next worker must still hear the abort.
    job = await running(conn, "gpu-1")
    await call(conn, "release_job", id=job["id"], worker_id="gpu-1")
    (again,) = await call(conn, "claim_jobs", worker_id="gpu-2", limit=1)
    assert again["id"] == job["id"]
    await listener.since_last(conn)
    await call(conn, "cancel_job", id=job["id"])
    assert await listener.since_last(conn) == [
        {"event": "abort", "id": job["id"], "worker_id": "gpu-2", "status": "cancelled"}
    ]


async def test_nothing_is_sent_for_a_rolled_back_create(conn: Conn, listener: Listener) -> None:
    with pytest.raises(asyncpg.PostgresError):
        async with conn.transaction():
            await create(conn)
            await conn.execute("SELECT 1/0")
    assert await listener.since_last(conn) == []


async def test_lease_expiry_at_max_attempts_tells_the_worker_to_abort(conn: Conn, listener: Listener) -> None:
    job = await running(conn, "gpu-4", max_attempts=1)
    await conn.execute("UPDATE aiservice.jobs SET lease_expires_at = now() - interval '1 second'")
    await listener.since_last(conn)
    (expired,) = await call(conn, "expire_leases")
    assert (expired["status"], expired["error_category"]) == ("failed", "lease_expired")
    assert await listener.since_last(conn) == [
        {"event": "abort", "id": job["id"], "worker_id": "gpu-4", "status": "failed"}
    ]
