"""The SQL API called directly, as other services call it: every public function in schema/.

Custom SQLSTATEs: AS404 not found, AS409 wrong state, AS410 lease lost (fencing), AS422 invalid argument.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlapi import (
    Conn,
    call,
    claim,
    count,
    create,
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


# --- claim_jobs -------------------------------------------------------------------------------------


# --- heartbeat_job ----------------------------------------------------------------------------------


# --- complete_job -----------------------------------------------------------------------------------


# --- fail_job ---------------------------------------------------------------------------------------


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


# --- release_job ------------------------------------------------------------------------------------


# --- fencing ----------------------------------------------------------------------------------------


# --- expire_leases ----------------------------------------------------------------------------------


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
