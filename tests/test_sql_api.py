"""The SQL API called directly, as other services call it: every public function in schema/.

Custom SQLSTATEs: AS404 not found, AS409 wrong state, AS410 lease lost (fencing), AS422 invalid argument.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from sqlapi import (
    JOB,
    RETRYABLE,
    Conn,
    call,
    claim,
    count,
    create,
    create_jobs,
    expire_lease,
    get,
    one,
    refused,
    running,
)

from aiservice.db.store import JobStore
from aiservice.jobs import JobStatus

# --- the enum ---------------------------------------------------------------------------------------


async def test_python_status_enum_equals_the_sql_enum(store: JobStore) -> None:
    assert await store.statuses() == [s.value for s in JobStatus]


# --- create_job -------------------------------------------------------------------------------------


# --- create_jobs ------------------------------------------------------------------------------------


# --- get_job ----------------------------------------------------------------------------------------


async def test_get_job(conn: Conn) -> None:
    job = await create(conn, input={"x": 1})
    got = await get(conn, job["id"])
    assert (got["id"], got["input"], got["status"]) == (job["id"], {"x": 1}, "pending")
    message = await refused("AS404", get(conn, 123456))
    assert "123456" in message


# --- list_jobs --------------------------------------------------------------------------------------


async def _fleet(conn: Conn) -> dict[str, int]:
    """Jobs of two owners, three kinds and every status; returns ids by name."""
    ids: dict[str, int] = {}
    specs = {
        "tel_chat": {"owner_ref": "call/1"},
        "tel_chat2": {"owner_ref": "call/2"},
        "tel_whisper": {"owner_ref": "call/1", "task_type": "transcribe", "model_profile": "whisperx"},
        "tg_chat": {"owner_service": "monitoring-tg", "owner_ref": "channel/1"},
        "tg_vision": {"owner_service": "monitoring-tg", "owner_ref": "channel/2", "model_profile": "vision"},
    }
    for name, spec in specs.items():
        ids[name] = (await create(conn, **spec))["id"]
    # tel_chat completed, tg_chat failed, tg_vision cancelled, tel_whisper running, tel_chat2 pending
    (c,) = await call(
        conn, "claim_jobs", worker_id="w", limit=1, task_types=["llm_chat"], model_profiles=["qwen2.5-14b"]
    )
    assert c["id"] == ids["tel_chat"]
    await call(conn, "complete_job", id=c["id"], worker_id="w", result={})
    await conn.execute("UPDATE aiservice.jobs SET priority = 1 WHERE id = $1", ids["tg_chat"])
    (f,) = await claim(conn, "w")
    assert f["id"] == ids["tg_chat"]
    await call(conn, "fail_job", id=f["id"], worker_id="w", error_category="bad_input")
    await call(conn, "cancel_job", id=ids["tg_vision"])
    (r,) = await call(conn, "claim_jobs", worker_id="w", task_types=["transcribe"])
    assert r["id"] == ids["tel_whisper"]
    return ids


async def listed(conn: Conn, **filters: Any) -> list[int]:
    return [r["id"] for r in await call(conn, "list_jobs", **filters)]


async def test_list_jobs_newest_first_with_every_filter(conn: Conn) -> None:
    ids = await _fleet(conn)
    assert await listed(conn) == sorted(ids.values(), reverse=True)
    for filters, expected in [
        ({"owner_service": "telephony"}, ["tel_chat", "tel_chat2", "tel_whisper"]),
        ({"owner_service": "nobody"}, []),
        ({"owner_ref": "call/1"}, ["tel_chat", "tel_whisper"]),
        ({"task_type": "transcribe"}, ["tel_whisper"]),
        ({"model_profile": "qwen2.5-14b"}, ["tel_chat", "tel_chat2", "tg_chat"]),
        ({"statuses": ["pending"]}, ["tel_chat2"]),
        ({"statuses": ["running"]}, ["tel_whisper"]),
        ({"statuses": ["completed"]}, ["tel_chat"]),
        ({"statuses": ["failed"]}, ["tg_chat"]),
        ({"statuses": ["cancelled"]}, ["tg_vision"]),
        ({"statuses": ["failed", "cancelled", "completed"]}, ["tel_chat", "tg_chat", "tg_vision"]),
        ({"statuses": []}, []),
        ({"owner_service": "monitoring-tg", "model_profile": "vision"}, ["tg_vision"]),
        ({"owner_service": "telephony", "owner_ref": "call/1", "statuses": ["running"]}, ["tel_whisper"]),
        (
            {"owner_service": "telephony", "task_type": "llm_chat", "statuses": ["pending", "completed"]},
            ["tel_chat", "tel_chat2"],
        ),
    ]:
        assert await listed(conn, **filters) == sorted((ids[name] for name in expected), reverse=True), filters
    wanted = [ids["tel_chat"], ids["tg_vision"], 999_999]
    assert await listed(conn, ids=wanted) == sorted(wanted[:2], reverse=True)
    assert await listed(conn, ids=wanted, statuses=["cancelled"]) == [ids["tg_vision"]]


async def test_list_jobs_created_after_is_inclusive_and_created_before_exclusive(conn: Conn) -> None:
    day = datetime(2024, 3, 1, tzinfo=UTC)
    jobs = [(await create(conn, owner_ref=str(i)))["id"] for i in range(4)]
    for i, job_id in enumerate(jobs):
        await conn.execute("UPDATE aiservice.jobs SET created_at = $2 WHERE id = $1", job_id, day + timedelta(days=i))
    assert await listed(conn, created_after=day + timedelta(days=1)) == jobs[:0:-1]
    assert await listed(conn, created_before=day + timedelta(days=2)) == jobs[1::-1]
    window = {"created_after": day + timedelta(days=1), "created_before": day + timedelta(days=3)}
    assert await listed(conn, **window) == [jobs[2], jobs[1]]
    assert await listed(conn, created_after=day + timedelta(hours=1), created_before=day + timedelta(hours=2)) == []


async def test_list_jobs_keyset_pagination(conn: Conn) -> None:
    jobs = [r["id"] for r in await create_jobs(conn, [{"owner_ref": str(i)} for i in range(7)], JOB)]
    await create(conn, owner_service="other")  # filtered out on every page
    pages: list[list[int]] = []
    before: int | None = None
    while True:
        page = await listed(conn, owner_service="telephony", limit=3, before_id=before)
        if not page:
            break
        pages.append(page)
        before = page[-1]
    newest_first = sorted(jobs, reverse=True)
    assert pages == [newest_first[0:3], newest_first[3:6], newest_first[6:]]


async def test_list_jobs_limit(conn: Conn) -> None:
    await create_jobs(conn, [{"owner_ref": str(i)} for i in range(60)], JOB)
    assert len(await listed(conn)) == 50  # the default
    assert len(await listed(conn, limit=7)) == 7
    assert len(await listed(conn, limit=None)) == 60


# --- claim_jobs -------------------------------------------------------------------------------------


# --- heartbeat_job ----------------------------------------------------------------------------------


async def test_heartbeat_extends_the_lease(conn: Conn) -> None:
    job = await running(conn, lease=timedelta(seconds=30))
    (row,) = await call(conn, "heartbeat_job", id=job["id"], worker_id="w1", lease_timeout=timedelta(minutes=10))
    expires = row[0]
    after = await get(conn, job["id"])
    assert after["lease_expires_at"] == expires
    assert expires - after["updated_at"] == timedelta(minutes=10)
    assert expires > job["lease_expires_at"]
    assert (after["status"], after["lease_token"], after["attempts"]) == ("running", job["lease_token"], 1)
    (row,) = await call(conn, "heartbeat_job", id=job["id"], worker_id="w1", lease_token=job["lease_token"])
    assert row[0] - (await get(conn, job["id"]))["updated_at"] == timedelta(minutes=15)
    # an expired lease that no one took yet can still be extended
    job = await running(conn)
    await expire_lease(conn, job["id"])
    await call(conn, "heartbeat_job", id=job["id"], worker_id="w1", lease_token=job["lease_token"])
    assert await call(conn, "expire_leases") == []
    assert (await get(conn, job["id"]))["status"] == "running"


async def test_heartbeat_refusals(conn: Conn) -> None:
    job = await running(conn)
    await refused("AS410", call(conn, "heartbeat_job", id=job["id"], worker_id="w2"))
    await refused("AS410", call(conn, "heartbeat_job", id=job["id"], worker_id="w1", lease_token=uuid.uuid4()))
    await refused("AS422", call(conn, "heartbeat_job", id=job["id"], worker_id="w1", lease_timeout=timedelta(0)))
    await refused("AS404", call(conn, "heartbeat_job", id=987654, worker_id="w1"))
    pending = await create(conn)
    await refused("AS410", call(conn, "heartbeat_job", id=pending["id"], worker_id="w1"))
    assert (await get(conn, job["id"]))["lease_expires_at"] == job["lease_expires_at"]


# --- complete_job -----------------------------------------------------------------------------------


async def test_complete_job(conn: Conn) -> None:
    job = await running(conn)
    done = await one(conn, "complete_job", id=job["id"], worker_id="w1", result={"content": "hi", "usage": {"t": 3}})
    assert done["status"] == "completed"
    assert done["result"] == {"content": "hi", "usage": {"t": 3}}
    assert done["finished_at"] == done["updated_at"]
    assert done["lease_token"] is done["lease_expires_at"] is None
    assert done["worker_id"] == "w1"  # who ran it stays
    assert done["attempts"] == 1
    assert dict(await get(conn, job["id"])) == dict(done)


async def test_complete_job_with_the_lease_token_and_clears_an_earlier_error(conn: Conn) -> None:
    job = await running(conn)
    await call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="timeout", retry_after=timedelta(0))
    (again,) = await claim(conn, "w2")
    done = await one(
        conn, "complete_job", id=job["id"], worker_id="w2", result={"ok": 1}, lease_token=again["lease_token"]
    )
    assert (done["status"], done["error_category"], done["error_message"]) == ("completed", None, None)
    assert done["attempts"] == 2


async def test_complete_job_refusals(conn: Conn) -> None:
    job = await running(conn)
    for result in [None, [1], "done", 3]:
        await refused("AS422", call(conn, "complete_job", id=job["id"], worker_id="w1", result=result))
    assert (await get(conn, job["id"]))["status"] == "running"
    await refused("AS404", call(conn, "complete_job", id=424242, worker_id="w1", result={}))
    pending = await create(conn)
    await refused("AS410", call(conn, "complete_job", id=pending["id"], worker_id="w1", result={}))
    job = await running(conn)
    await refused("AS410", call(conn, "complete_job", id=job["id"], worker_id="w2", result={}))
    await call(conn, "complete_job", id=job["id"], worker_id="w1", result={"n": 1})
    await refused("AS410", call(conn, "complete_job", id=job["id"], worker_id="w1", result={"n": 2}))
    assert (await get(conn, job["id"]))["result"] == {"n": 1}


# --- fail_job ---------------------------------------------------------------------------------------


def delay(job: asyncpg.Record) -> float:
    """Seconds between the failure (updated_at) and the next run (run_at): both set from now()."""
    seconds: float = (job["run_at"] - job["updated_at"]).total_seconds()
    return seconds


async def test_fail_non_retryable_category_fails_the_job(conn: Conn) -> None:
    job = await running(conn)
    failed = await one(
        conn, "fail_job", id=job["id"], worker_id="w1", error_category="bad_input", error_message="no messages"
    )
    assert failed["status"] == "failed"
    assert (failed["error_category"], failed["error_message"]) == ("bad_input", "no messages")
    assert failed["finished_at"] == failed["updated_at"]
    assert failed["worker_id"] == "w1"
    assert failed["lease_token"] is failed["lease_expires_at"] is None
    assert failed["run_at"] == job["run_at"]
    assert await claim(conn) == []


async def test_fail_retryable_categories_back_off(conn: Conn) -> None:
    for category in RETRYABLE:
        job = await running(conn)
        retry = await one(conn, "fail_job", id=job["id"], worker_id="w1", error_category=category, error_message="slow")
        assert retry["status"] == "pending"
        assert (retry["error_category"], retry["error_message"]) == (category, "slow")
        assert retry["attempts"] == 1
        assert retry["worker_id"] is retry["lease_token"] is retry["lease_expires_at"] is retry["finished_at"] is None
        assert 7.5 <= delay(retry) <= 12.5, category  # 10 s ± 25 %
    assert await claim(conn) == []  # none is due yet


async def test_fail_backoff_doubles_per_attempt_up_to_an_hour(conn: Conn) -> None:
    for attempts, base in [(2, 20), (3, 40), (5, 160), (9, 2560), (10, 3600), (30, 3600)]:
        job = await running(conn, max_attempts=100)
        await conn.execute("UPDATE aiservice.jobs SET attempts = $2 WHERE id = $1", job["id"], attempts)
        retry = await one(conn, "fail_job", id=job["id"], worker_id="w1", error_category="timeout")
        assert retry["status"] == "pending"
        assert base * 0.75 <= delay(retry) <= base * 1.25, attempts


async def test_fail_backoff_at_high_attempt_counts(conn: Conn) -> None:
    # max_attempts goes up to 100; the delay must stay capped instead of overflowing an interval.
    job = await running(conn, max_attempts=100)
    await conn.execute("UPDATE aiservice.jobs SET attempts = 99 WHERE id = $1", job["id"])
    retry = await one(conn, "fail_job", id=job["id"], worker_id="w1", error_category="rate_limited")
    assert retry["status"] == "pending"
    assert 2700 <= delay(retry) <= 4500


async def test_backoff_function_bounds_and_jitter(conn: Conn) -> None:
    for attempts, base in [(0, 10), (1, 10), (2, 20), (4, 80), (12, 3600), (100, 3600), (10_000, 3600)]:
        seconds = [
            r[0]
            for r in await conn.fetch(
                "SELECT extract(epoch FROM aiservice.backoff($1))::float8 FROM generate_series(1, 200)", attempts
            )
        ]
        assert base * 0.75 <= min(seconds) <= max(seconds) <= base * 1.25, attempts
        assert max(seconds) - min(seconds) > base * 0.1, "no jitter"


async def test_fail_retry_after_overrides_the_backoff(conn: Conn) -> None:
    job = await running(conn)
    retry = await one(
        conn, "fail_job", id=job["id"], worker_id="w1", error_category="rate_limited", retry_after=timedelta(seconds=90)
    )
    assert retry["status"] == "pending"
    assert delay(retry) == 90
    job = await running(conn, model_profile="other")  # rate_limited cooled the first profile down
    now = await one(conn, "fail_job", id=job["id"], worker_id="w1", error_category="timeout", retry_after=timedelta(0))
    assert delay(now) == 0
    assert [r["id"] for r in await claim(conn)] == [job["id"]]


async def test_fail_with_attempts_exhausted_fails_the_job(conn: Conn) -> None:
    job = await running(conn, max_attempts=2)
    retry = await one(
        conn, "fail_job", id=job["id"], worker_id="w1", error_category="timeout", retry_after=timedelta(0)
    )
    assert retry["status"] == "pending"
    (second,) = await claim(conn, "w2")
    assert second["attempts"] == 2
    failed = await one(
        conn, "fail_job", id=job["id"], worker_id="w2", error_category="timeout", retry_after=timedelta(0)
    )
    assert failed["status"] == "failed"
    assert failed["error_category"] == "timeout"
    assert failed["finished_at"] is not None
    assert failed["worker_id"] == "w2"


async def test_fail_retryable_overrides_the_category_default(conn: Conn) -> None:
    job = await running(conn)
    retry = await one(conn, "fail_job", id=job["id"], worker_id="w1", error_category="bad_output", retryable=True)
    assert retry["status"] == "pending"
    assert 7.5 <= delay(retry) <= 12.5
    job = await running(conn)
    failed = await one(conn, "fail_job", id=job["id"], worker_id="w1", error_category="timeout", retryable=False)
    assert failed["status"] == "failed"
    job = await running(conn, max_attempts=1)
    failed = await one(conn, "fail_job", id=job["id"], worker_id="w1", error_category="x", retryable=True)
    assert failed["status"] == "failed"  # retryable cannot exceed max_attempts


async def test_fail_truncates_the_message_and_validates_its_arguments(conn: Conn) -> None:
    job = await running(conn)
    failed = await one(conn, "fail_job", id=job["id"], worker_id="w1", error_category="boom", error_message="é" * 5000)
    assert failed["error_message"] == "é" * 4000
    job = await running(conn)
    for args in [
        {"error_category": None},
        {"error_category": ""},
        {"error_category": "Timeout"},
        {"error_category": "1st"},
        {"error_category": "with space"},
        {"error_category": "a" * 65},
        {"error_category": "timeout", "retry_after": timedelta(seconds=-1)},
        {"error_category": "timeout", "retry_after": timedelta(days=7, seconds=1)},
    ]:
        await refused("AS422", call(conn, "fail_job", id=job["id"], worker_id="w1", **args))
    assert (await get(conn, job["id"]))["status"] == "running"


async def test_fail_refusals(conn: Conn) -> None:
    await refused("AS404", call(conn, "fail_job", id=777, worker_id="w1", error_category="timeout"))
    job = await running(conn)
    await refused("AS410", call(conn, "fail_job", id=job["id"], worker_id="w2", error_category="timeout"))
    await refused(
        "AS410",
        call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="timeout", lease_token=uuid.uuid4()),
    )
    await call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="bad_input")
    await refused("AS410", call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="bad_input"))


# --- release_job ------------------------------------------------------------------------------------


async def test_release_job_returns_it_without_using_an_attempt(conn: Conn) -> None:
    job = await running(conn, max_attempts=1)
    for _ in range(3):
        released = await one(conn, "release_job", id=job["id"], worker_id="w1", lease_token=job["lease_token"])
        assert released["status"] == "pending"
        assert released["attempts"] == 0
        assert released["error_category"] == "worker_shutdown"
        assert released["worker_id"] is released["started_at"] is released["lease_token"] is None
        assert released["run_at"] == released["updated_at"]
        (job,) = await claim(conn)
        assert job["attempts"] == 1
    done = await one(conn, "complete_job", id=job["id"], worker_id="w1", result={})
    assert done["status"] == "completed"


async def test_release_job_refusals(conn: Conn) -> None:
    await refused("AS404", call(conn, "release_job", id=55, worker_id="w1"))
    job = await running(conn)
    await refused("AS410", call(conn, "release_job", id=job["id"], worker_id="w2"))
    await refused("AS410", call(conn, "release_job", id=job["id"], worker_id="w1", lease_token=uuid.uuid4()))
    await call(conn, "release_job", id=job["id"], worker_id="w1")
    await refused("AS410", call(conn, "release_job", id=job["id"], worker_id="w1"))


# --- fencing ----------------------------------------------------------------------------------------


async def test_stale_worker_is_fenced_after_its_job_was_reclaimed(conn: Conn) -> None:
    job = await create(conn)
    (stale,) = await claim(conn, "worker-a", lease_timeout=timedelta(milliseconds=50))
    await asyncio.sleep(0.2)
    (fresh,) = await claim(conn, "worker-b")
    assert fresh["id"] == job["id"]
    assert (fresh["attempts"], fresh["worker_id"]) == (2, "worker-b")

    a = {"id": job["id"], "worker_id": "worker-a"}
    await refused("AS410", call(conn, "complete_job", **a, result={"from": "a"}))
    await refused("AS410", call(conn, "complete_job", **a, result={"from": "a"}, lease_token=stale["lease_token"]))
    await refused("AS410", call(conn, "fail_job", **a, error_category="timeout"))
    await refused("AS410", call(conn, "heartbeat_job", **a))
    await refused("AS410", call(conn, "release_job", **a))
    current = await get(conn, job["id"])
    assert dict(current) == dict(fresh)

    await call(conn, "complete_job", id=job["id"], worker_id="worker-b", result={"from": "b"})
    await refused("AS410", call(conn, "complete_job", **a, result={"from": "a"}))
    await refused("AS410", call(conn, "fail_job", **a, error_category="bad_input"))
    done = await get(conn, job["id"])
    assert (done["status"], done["result"], done["worker_id"]) == ("completed", {"from": "b"}, "worker-b")


async def test_lease_token_fences_the_same_worker_id(conn: Conn) -> None:
    # A worker restarted under the same WORKER_ID re-claims its own expired job: the old
    # attempt's token must not touch the new attempt.
    old = await running(conn, "w1")
    await expire_lease(conn, old["id"])
    (new,) = await claim(conn, "w1")
    assert new["id"] == old["id"] and new["lease_token"] != old["lease_token"]
    stale = {"id": old["id"], "worker_id": "w1", "lease_token": old["lease_token"]}
    await refused("AS410", call(conn, "complete_job", **stale, result={"old": True}))
    await refused("AS410", call(conn, "fail_job", **stale, error_category="timeout"))
    await refused("AS410", call(conn, "heartbeat_job", **stale))
    await refused("AS410", call(conn, "release_job", **stale))
    await refused("AS410", call(conn, "complete_job", **(stale | {"lease_token": uuid.uuid4()}), result={}))
    assert dict(await get(conn, old["id"])) == dict(new)
    done = await one(
        conn, "complete_job", id=old["id"], worker_id="w1", result={"new": 1}, lease_token=new["lease_token"]
    )
    assert done["result"] == {"new": 1}


async def test_cancelled_or_retried_running_job_fences_its_worker(conn: Conn) -> None:
    job = await running(conn)
    await call(conn, "cancel_job", id=job["id"])
    await refused("AS410", call(conn, "complete_job", id=job["id"], worker_id="w1", result={}))
    await refused("AS410", call(conn, "heartbeat_job", id=job["id"], worker_id="w1"))
    job = await running(conn)
    await call(conn, "retry_job", id=job["id"])
    await refused("AS410", call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="timeout"))
    assert (await get(conn, job["id"]))["status"] == "pending"


# --- expire_leases ----------------------------------------------------------------------------------


async def test_expired_lease_returns_the_job_to_the_queue(conn: Conn) -> None:
    await running(conn)
    await create(conn)
    assert await call(conn, "expire_leases") == []
    assert await count(conn, "status = 'running'") == 1
    other = await running(conn, "w2")
    job = await running(conn, "w1", lease=timedelta(milliseconds=50))
    await asyncio.sleep(0.2)
    (expired,) = await call(conn, "expire_leases")
    assert expired["id"] == job["id"]
    assert expired["status"] == "pending"
    assert expired["attempts"] == 1
    assert expired["error_category"] == "lease_expired"
    assert "w1" in expired["error_message"]
    assert expired["worker_id"] is expired["lease_token"] is expired["lease_expires_at"] is None
    assert expired["finished_at"] is None
    assert expired["run_at"] == expired["updated_at"]
    assert (await get(conn, other["id"]))["status"] == "running"
    assert await call(conn, "expire_leases") == []
    (again,) = await claim(conn, "w3")
    assert (again["id"], again["attempts"]) == (job["id"], 2)


async def test_expired_lease_at_max_attempts_fails_the_job(conn: Conn) -> None:
    job = await running(conn, "w1", max_attempts=2)
    await expire_lease(conn, job["id"])
    (job,) = await claim(conn, "w2")
    assert job["attempts"] == 2
    await expire_lease(conn, job["id"])
    (failed,) = await call(conn, "expire_leases")
    assert failed["status"] == "failed"
    assert (failed["error_category"], failed["attempts"]) == ("lease_expired", 2)
    assert failed["finished_at"] == failed["updated_at"]
    assert failed["worker_id"] == "w2"
    assert failed["lease_token"] is failed["lease_expires_at"] is None
    assert await claim(conn) == []


async def test_no_job_stays_running_after_its_worker_died(conn: Conn) -> None:
    job = await running(conn, "dead", max_attempts=3)
    for attempt in range(1, 4):
        await expire_lease(conn, job["id"])
        claimed = await claim(conn, f"w{attempt}")
        if attempt < 3:
            assert claimed[0]["attempts"] == attempt + 1
    assert (await get(conn, job["id"]))["status"] == "failed"


# --- retry_job / retry_jobs -------------------------------------------------------------------------


async def test_retry_job_resets_a_failed_job(conn: Conn) -> None:
    job = await running(conn, max_attempts=1)
    await call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="timeout", error_message="x")
    retried = await one(conn, "retry_job", id=job["id"])
    assert retried["status"] == "pending"
    assert retried["attempts"] == 0
    for column in (
        "result",
        "error_category",
        "error_message",
        "worker_id",
        "lease_token",
        "started_at",
        "finished_at",
    ):
        assert retried[column] is None, column
    assert retried["run_at"] == retried["updated_at"]
    assert [r["id"] for r in await claim(conn)] == [job["id"]]


async def test_retry_job_resets_a_running_job_and_refuses_other_states(conn: Conn) -> None:
    job = await running(conn)
    retried = await one(conn, "retry_job", id=job["id"])
    assert (retried["status"], retried["attempts"], retried["lease_token"]) == ("pending", 0, None)
    await refused("AS409", call(conn, "retry_job", id=job["id"]))  # pending
    (again,) = await claim(conn)
    assert (again["id"], again["attempts"]) == (job["id"], 1)
    await call(conn, "complete_job", id=job["id"], worker_id="w1", result={"r": 1})
    await refused("AS409", call(conn, "retry_job", id=job["id"]))  # completed
    assert (await get(conn, job["id"]))["result"] == {"r": 1}
    cancelled = await create(conn)
    await call(conn, "cancel_job", id=cancelled["id"])
    await refused("AS409", call(conn, "retry_job", id=cancelled["id"]))
    await refused("AS404", call(conn, "retry_job", id=31337))


async def test_retry_jobs_by_filter(conn: Conn) -> None:
    ids = await _fleet(conn)  # tg_chat failed, tel_whisper running
    assert sorted(r[0] for r in await call(conn, "retry_jobs", owner_service="monitoring-tg")) == [ids["tg_chat"]]
    assert await call(conn, "retry_jobs", owner_service="monitoring-tg") == []
    assert [r[0] for r in await call(conn, "retry_jobs", statuses=["running"])] == [ids["tel_whisper"]]
    statuses = {r["id"]: r["status"] for r in await call(conn, "list_jobs")}
    assert statuses == {
        ids["tel_chat"]: "completed",
        ids["tel_chat2"]: "pending",
        ids["tel_whisper"]: "pending",
        ids["tg_chat"]: "pending",
        ids["tg_vision"]: "cancelled",
    }


async def test_retry_jobs_narrowed_by_status_and_ids(conn: Conn) -> None:
    ids = await _fleet(conn)
    assert await call(conn, "retry_jobs", statuses=["failed"], task_type="transcribe") == []
    assert await call(conn, "retry_jobs", ids=[ids["tel_chat"], ids["tg_vision"], ids["tel_chat2"]]) == []
    got = await call(conn, "retry_jobs", ids=[ids["tg_chat"], ids["tel_whisper"]], statuses=["failed"])
    assert [r[0] for r in got] == [ids["tg_chat"]]
    assert (await get(conn, ids["tel_whisper"]))["status"] == "running"


async def test_retry_jobs_created_window(conn: Conn) -> None:
    ids = await _fleet(conn)
    await conn.execute("UPDATE aiservice.job_history SET created_at = '2024-01-01' WHERE id = $1", ids["tg_chat"])
    got = await call(conn, "retry_jobs", created_before=datetime(2024, 1, 2, tzinfo=UTC))
    assert [r[0] for r in got] == [ids["tg_chat"]]
    got = await call(conn, "retry_jobs", created_after=datetime(2024, 1, 2, tzinfo=UTC))
    assert [r[0] for r in got] == [ids["tel_whisper"]]


async def test_retry_jobs_refuses_an_empty_filter_unless_all(conn: Conn) -> None:
    ids = await _fleet(conn)
    message = await refused("AS422", call(conn, "retry_jobs"))
    assert "p_all" in message
    await refused("AS422", call(conn, "retry_jobs", all=False))
    for statuses in [["pending"], ["completed"], ["cancelled"], ["failed", "completed"]]:
        await refused("AS422", call(conn, "retry_jobs", statuses=statuses))
        await refused("AS422", call(conn, "retry_jobs", statuses=statuses, all=True))
    assert await count(conn, "status = 'pending'") == 1
    got = sorted(r[0] for r in await call(conn, "retry_jobs", all=True))
    assert got == sorted([ids["tg_chat"], ids["tel_whisper"]])


# --- cancel_job / cancel_jobs -----------------------------------------------------------------------


async def test_cancel_job_pending_and_running(conn: Conn) -> None:
    pending = await create(conn)
    cancelled = await one(conn, "cancel_job", id=pending["id"])
    assert cancelled["status"] == "cancelled"
    assert cancelled["finished_at"] == cancelled["updated_at"]
    job = await running(conn)
    cancelled = await one(conn, "cancel_job", id=job["id"])
    assert cancelled["status"] == "cancelled"
    assert cancelled["lease_token"] is cancelled["lease_expires_at"] is None
    assert cancelled["worker_id"] == "w1"
    assert await claim(conn) == []


async def test_cancel_job_refusals(conn: Conn) -> None:
    await refused("AS404", call(conn, "cancel_job", id=8080))
    ids = await _fleet(conn)
    for name in ("tel_chat", "tg_chat", "tg_vision"):  # completed, failed, cancelled
        before = await get(conn, ids[name])
        await refused("AS409", call(conn, "cancel_job", id=ids[name]))
        assert dict(await get(conn, ids[name])) == dict(before)


async def test_cancel_jobs_by_filter(conn: Conn) -> None:
    ids = await _fleet(conn)
    got = sorted(r[0] for r in await call(conn, "cancel_jobs", owner_service="telephony"))
    assert got == sorted([ids["tel_chat2"], ids["tel_whisper"]])
    assert (await get(conn, ids["tel_chat"]))["status"] == "completed"
    assert await call(conn, "cancel_jobs", owner_service="telephony") == []


async def test_cancel_jobs_narrowed_by_status_ids_and_kind(conn: Conn) -> None:
    ids = await _fleet(conn)
    assert [r[0] for r in await call(conn, "cancel_jobs", statuses=["pending"])] == [ids["tel_chat2"]]
    assert await call(conn, "cancel_jobs", ids=[ids["tel_chat"], ids["tg_chat"]]) == []
    assert await call(conn, "cancel_jobs", task_type="transcribe", model_profile="qwen2.5-14b") == []
    got = await call(conn, "cancel_jobs", task_type="transcribe", model_profile="whisperx", owner_ref="call/1")
    assert [r[0] for r in got] == [ids["tel_whisper"]]


async def test_cancel_jobs_refuses_an_empty_filter_unless_all(conn: Conn) -> None:
    ids = await _fleet(conn)
    message = await refused("AS422", call(conn, "cancel_jobs"))
    assert "p_all" in message
    await refused("AS422", call(conn, "cancel_jobs", all=None))
    for statuses in [["completed"], ["failed"], ["cancelled"], ["pending", "failed"]]:
        await refused("AS422", call(conn, "cancel_jobs", statuses=statuses))
    assert await count(conn, "status = 'cancelled'") == 1
    got = sorted(r[0] for r in await call(conn, "cancel_jobs", all=True))
    assert got == sorted([ids["tel_chat2"], ids["tel_whisper"]])
    assert await count(conn, "status IN ('pending', 'running')") == 0


# --- stats ------------------------------------------------------------------------------------------


async def test_stats(conn: Conn) -> None:
    assert await conn.fetchval("SELECT aiservice.stats()") == {
        "window_seconds": 3600,
        "totals": {"pending": 0, "running": 0, "completed": 0, "failed": 0, "cancelled": 0},
        "by_status": [],
        "created": [],
        "errors": [],
        "errors_last_hour": [],
        "oldest_pending_age_seconds": None,
        "oldest_pending": [],
        "completed_per_minute": {"last_5m": 0, "last_60m": 0},
        "latency": [],
        "running_by_worker": [],
        "limits": [],
        "per_minute": [],
    }
    await _fleet(conn)
    await create(conn, owner_ref="old", run_at=datetime.now(UTC) - timedelta(hours=1))
    await create(conn, owner_ref="future", run_at=datetime.now(UTC) + timedelta(hours=2))
    job = await running(conn, task_type="transcribe", model_profile="whisperx")
    await call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="bad_input")
    job = await running(conn, task_type="transcribe", model_profile="whisperx")
    await call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="bad_input")
    job = await running(conn, max_attempts=1)
    await call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="timeout")
    job = await running(conn)
    await call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="rate_limited")  # pending again

    stats = await conn.fetchval("SELECT aiservice.stats()")
    counts = {(s["status"], s["task_type"], s["model_profile"]): s["count"] for s in stats["by_status"]}
    assert counts == {
        ("completed", "llm_chat", "qwen2.5-14b"): 1,
        ("failed", "llm_chat", "qwen2.5-14b"): 2,
        ("failed", "transcribe", "whisperx"): 2,
        ("cancelled", "llm_chat", "vision"): 1,
        ("running", "transcribe", "whisperx"): 1,
        ("pending", "llm_chat", "qwen2.5-14b"): 4,
    }
    assert stats["errors"] == [
        {"error_category": "bad_input", "count": 3},
        {"error_category": "timeout", "count": 1},
    ]
    age = stats["oldest_pending_age_seconds"]
    assert 3600 <= age < 3600 + 600
