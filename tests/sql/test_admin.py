"""retry_job(s) and cancel_job(s) (schema/functions/admin.sql): by id and by filter, and writers of many
jobs on separate connections."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime
from functools import partial
from typing import Any

import asyncpg
from sqlapi import CREATE_JOBS, JOB, Conn, Connections, call, claim, count, create, get, one, refused, running, together
from stubs import wait_for


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


# --- The SQL API under concurrent callers on separate connections (SKIP LOCKED, idempotency, fencing).


async def complete(c: Conn, job_id: int, worker: str, token: Any = None) -> str:
    try:
        await c.execute("SELECT id FROM aiservice.complete_job($1, $2, $3, $4)", job_id, worker, {"by": worker}, token)
    except asyncpg.PostgresError as exc:
        return str(exc.sqlstate)
    return "ok"


async def waiting_for_a_lock(conn: Conn, pid: int) -> None:
    """Until the backend ``pid`` waits for a lock another transaction holds."""

    async def waits() -> bool:
        return bool(await conn.fetchval("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid))

    await wait_for(waits, what=f"backend {pid} to wait for a lock")


async def test_writers_of_many_jobs_never_deadlock(conn: Conn, connections: Connections) -> None:
    """complete_jobs, cancel_jobs and retry_jobs on overlapping jobs, given in different orders: all
    lock in ascending id order, so they wait for each other but never in a cycle."""
    completer, canceller, retrier = await connections(3)
    outcomes: Counter[str] = Counter()
    for round_ in range(30):
        task_type = f"overlap_{round_}"
        await conn.fetch(CREATE_JOBS, [{"owner_ref": str(i)} for i in range(40)], JOB | {"task_type": task_type})
        claimed = await conn.fetch("SELECT id, lease_token FROM aiservice.claim_jobs('w1', 40, ARRAY[$1])", task_type)
        ids = sorted(r["id"] for r in claimed)
        assert len(ids) == 40

        async def run(c: Conn, sql: str, *args: Any) -> str:
            try:
                await c.fetch(sql, *args)
            except asyncpg.PostgresError as exc:
                return str(exc.sqlstate)
            return "ok"

        complete = "SELECT * FROM aiservice.complete_jobs('w1', $1, $2)"
        calls = [
            partial(run, completer, complete, ids[5:], [{"round": round_}] * 35),
            partial(run, canceller, "SELECT * FROM aiservice.cancel_jobs(p_ids => $1)", ids[::-1][:30]),
            partial(run, retrier, "SELECT * FROM aiservice.retry_jobs(p_ids => $1)", ids[10:][::-1]),
        ]
        outcomes.update(await together(calls))
    assert outcomes == Counter({"ok": 90}), outcomes


async def test_cancel_jobs_checks_its_filter_again_on_the_job_it_locked(conn: Conn, connections: Connections) -> None:
    """A claim makes the job running while cancel_jobs(statuses => pending) waits for its lock: the
    running job is left alone."""
    claimer, canceller = await connections(2)
    job_id = await conn.fetchval("SELECT (r.job).id FROM aiservice.create_job('s', 'r', 'recheck', 'm') r")
    claim = claimer.transaction()
    await claim.start()
    assert [r["id"] for r in await claimer.fetch("SELECT id FROM aiservice.claim_jobs('w1', 1, ARRAY['recheck'])")] == [
        job_id
    ]
    cancel = asyncio.ensure_future(
        canceller.fetch("SELECT * FROM aiservice.cancel_jobs(p_ids => $1, p_statuses => '{pending}')", [job_id])
    )
    await waiting_for_a_lock(conn, canceller.get_server_pid())
    await claim.commit()
    assert await cancel == []
    assert await conn.fetchval("SELECT status::text FROM aiservice.all_jobs WHERE id = $1", job_id) == "running"


async def test_retry_jobs_checks_its_filter_again_on_the_job_it_locked(conn: Conn, connections: Connections) -> None:
    """The job fails while retry_jobs(statuses => running) waits for its lock: the failed job stays failed."""
    failer, retrier = await connections(2)
    job_id = await conn.fetchval("SELECT (r.job).id FROM aiservice.create_job('s', 'r', 'recheck', 'm') r")
    await conn.execute("SELECT 1 FROM aiservice.claim_jobs('w1', 1, ARRAY['recheck'])")
    fail = failer.transaction()
    await fail.start()
    await failer.execute("SELECT 1 FROM aiservice.fail_job($1, 'w1', 'invalid_input', 'bad')", job_id)
    retry = asyncio.ensure_future(
        retrier.fetch("SELECT * FROM aiservice.retry_jobs(p_ids => $1, p_statuses => '{running}')", [job_id])
    )
    await waiting_for_a_lock(conn, retrier.get_server_pid())
    await fail.commit()
    assert await retry == []
    assert await conn.fetchval("SELECT status::text FROM aiservice.all_jobs WHERE id = $1", job_id) == "failed"
