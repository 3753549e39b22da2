"""Limits (schema/functions/limits.sql): set_limit, list_limits, delete_limit, pause and resume, caps,
starts and tokens per minute, cool-downs. Several connections where concurrency is the point."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from sqlapi import Conn, call, claim, jobs, one, set_limit

from aiservice import rules
from aiservice.jobs import LimitScope

# --- The scheduler: limits (pause, caps, per-minute starts and tokens, cool-down), fair share, claim cost.


async def complete(conn: Conn, job_id: int, worker: str = "w1", result: dict[str, Any] | None = None) -> None:
    await conn.execute("SELECT FROM aiservice.complete_job($1, $2, $3)", job_id, worker, result or {"ok": True})


async def test_python_scope_enum_equals_the_sql_enum(conn: Conn) -> None:
    labels = await conn.fetchval("SELECT enum_range(NULL::aiservice.limit_scope)::text[]")
    assert labels == [s.value for s in LimitScope]


async def test_set_list_and_delete_over_sql(conn: Conn) -> None:
    first = await set_limit(conn, "model_profile", "qwen", max_running=4, paused=True)
    assert (first["max_running"], first["paused"], first["cooldown"], first["running"]) == (4, True, True, 0)
    assert first["weight"] is None  # owner_service limits only
    kept = await set_limit(conn, "model_profile", "qwen", max_per_minute=60)  # fields not given keep their value
    assert (kept["max_running"], kept["max_per_minute"], kept["paused"]) == (4, 60, True)
    cleared = await set_limit(conn, "model_profile", "qwen", max_running=None, paused=None)
    assert (cleared["max_running"], cleared["paused"], cleared["max_per_minute"]) == (None, False, 60)
    assert [(r["scope"], r["name"]) for r in await call(conn, "list_limits")] == [("model_profile", "qwen")]
    await conn.execute("SELECT aiservice.delete_limit('model_profile', 'qwen')")
    with pytest.raises(asyncpg.PostgresError) as gone:
        await conn.execute("SELECT aiservice.delete_limit('model_profile', 'qwen')")
    assert gone.value.sqlstate == "AS404"


@pytest.mark.parametrize(
    ("scope", "fields", "reason"),
    [
        ("queue", {"paused": True}, "unknown scope"),
        ("task_type", {"max_running": -1}, "max_running must be an integer"),
        ("task_type", {"max_running": 2.5}, "max_running must be an integer"),
        ("task_type", {"max_per_minute": 10**12}, "max_per_minute must be an integer"),
        ("owner_service", {"weight": 0}, "weight must be an integer from 1"),
        ("task_type", {"paused": "yes"}, "paused must be true, false or null"),
        ("task_type", {"cooldown_until": "2030-01-01T00:00:00Z"}, "cooldown_until is set by rate-limited failures"),
        ("task_type", {"speed": 1}, "unknown field speed"),
    ],
)
async def test_bad_limits_are_refused_over_sql(conn: Conn, scope: str, fields: dict[str, Any], reason: str) -> None:
    with pytest.raises(asyncpg.PostgresError) as refused:
        await conn.fetch("SELECT * FROM aiservice.set_limit($1, 'x', $2)", scope, fields)
    assert refused.value.sqlstate == "AS422"
    assert reason in str(refused.value)


async def test_pause_holds_jobs_and_resume_wakes_listeners(conn: Conn, database_url: str) -> None:
    ids = await jobs(conn, 3, task_type="transcribe", model_profile="whisperx")
    await set_limit(conn, "task_type", "transcribe", paused=True)
    assert await claim(conn, limit=10) == []
    assert await conn.fetchval("SELECT count(*) FROM aiservice.all_jobs WHERE status = 'pending'") == 3

    listener = await asyncpg.connect(database_url)
    heard: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await listener.add_listener("aiservice_jobs", lambda *a: heard.put_nowait(json.loads(a[3])))
    try:
        await set_limit(conn, "task_type", "transcribe", paused=False)
        event = await asyncio.wait_for(heard.get(), 5)
        assert event == {"event": "pending", "task_type": "transcribe", "model_profile": None, "run_at": None}
    finally:
        await listener.close()
    assert sorted(r["id"] for r in await claim(conn, limit=10)) == ids


async def test_max_running_is_never_exceeded_by_concurrent_claimers(conn: Conn, database_url: str) -> None:
    await jobs(conn, 120, model_profile="gpu")
    await set_limit(conn, "model_profile", "gpu", max_running=3)
    peak = 0
    done = asyncio.Event()

    async def claimer(n: int) -> int:
        c = await asyncpg.connect(database_url)
        finished = 0
        try:
            while not done.is_set():
                got = await c.fetch("SELECT id FROM aiservice.claim_jobs($1, 2)", f"w{n}")
                if not got:
                    if not await c.fetchval("SELECT count(*) FROM aiservice.all_jobs WHERE status <> 'completed'"):
                        return finished
                    await asyncio.sleep(0.002)
                for row in got:
                    await asyncio.sleep(0.003)
                    await c.execute("SELECT FROM aiservice.complete_job($1, $2, '{}')", row["id"], f"w{n}")
                    finished += 1
            return finished
        finally:
            await c.close()

    async def sampler() -> None:
        nonlocal peak
        c = await asyncpg.connect(database_url)
        try:
            while not done.is_set():
                peak = max(peak, await c.fetchval("SELECT count(*) FROM aiservice.all_jobs WHERE status = 'running'"))
        finally:
            await c.close()

    sampling = asyncio.create_task(sampler())
    finished = await asyncio.wait_for(asyncio.gather(*(claimer(n) for n in range(8))), 60)
    done.set()
    await sampling
    assert sum(finished) == 120
    assert peak == 3


async def test_max_per_minute_counts_starts_in_the_trailing_minute(conn: Conn) -> None:
    await jobs(conn, 10, task_type="summarize")
    await set_limit(conn, "task_type", "summarize", max_per_minute=4)
    assert len(await claim(conn, limit=10)) == 4
    assert await claim(conn, limit=10) == []
    (usage,) = await call(conn, "list_limits")
    assert (usage["started_last_minute"], usage["running"]) == (4, 4)
    await conn.execute("UPDATE aiservice.limit_usage SET at = at - interval '61 seconds'")  # a minute passes
    assert len(await claim(conn, limit=10)) == 4


async def test_max_tokens_per_minute_stops_starts_while_over(conn: Conn) -> None:
    await jobs(conn, 5, model_profile="gpt")
    await set_limit(conn, "model_profile", "gpt", max_tokens_per_minute=100)
    (first,) = await claim(conn)
    await complete(conn, first["id"], result={"content": "hi", "usage": {"total_tokens": 150}})
    (usage,) = await call(conn, "list_limits")
    assert usage["tokens_last_minute"] == 150
    assert await claim(conn) == []
    await conn.execute("UPDATE aiservice.limit_usage SET at = at - interval '61 seconds'")
    assert len(await claim(conn)) == 1


async def test_a_rate_limited_failure_cools_down_only_its_profile(conn: Conn) -> None:
    a = await jobs(conn, 3, model_profile="provider-a")
    b = await jobs(conn, 2, model_profile="provider-b")
    (job,) = await claim(conn, model_profiles=["provider-a"])
    await conn.execute(
        "SELECT FROM aiservice.fail_job($1, 'w1', 'rate_limited', 'slow down', p_retry_after => '30 seconds')",
        job["id"],
    )
    (limit,) = await call(conn, "list_limits")
    assert (limit["scope"], limit["name"]) == ("model_profile", "provider-a")
    assert limit["cooldown_until"] is not None
    assert await claim(conn, limit=10, model_profiles=["provider-a"]) == []
    assert sorted(r["id"] for r in await claim(conn, limit=10)) == b  # the other profile runs on
    await set_limit(conn, "model_profile", "provider-a", cooldown_until=None)  # an operator ends it early
    assert {r["id"] for r in await claim(conn, limit=10)} == set(a) - {job["id"]}


async def test_cool_down_can_be_turned_off_per_profile(conn: Conn) -> None:
    await set_limit(conn, "model_profile", "provider-a", cooldown=False)
    await jobs(conn, 2, model_profile="provider-a")
    (job,) = await claim(conn)
    await conn.execute(
        "SELECT FROM aiservice.fail_job($1, 'w1', 'rate_limited', 'slow down', p_retry_after => '30 seconds')",
        job["id"],
    )
    assert len(await claim(conn)) == 1


# --- Claims under limits, where they used to go wrong: owners a claim cannot serve, starts counted per minute, a
# pause racing claims in flight, a provider's long retry_after, fields per scope.


WEEK = timedelta(days=7)


async def cooldown_left(conn: Conn, profile: str) -> timedelta:
    (row,) = await conn.fetch(
        "SELECT cooldown_until - now() AS left FROM aiservice.limits WHERE scope = 'model_profile' AND name = $1",
        profile,
    )
    left: timedelta = row["left"]
    return left


@pytest.mark.parametrize(
    ("cooldown_max", "bound"), [(None, timedelta(minutes=5)), (timedelta(seconds=90), timedelta(seconds=90))]
)
async def test_a_week_long_retry_after_cools_a_profile_down_for_the_bound_only(
    conn: Conn, cooldown_max: timedelta | None, bound: timedelta
) -> None:
    (job_id,) = await jobs(conn, 1, model_profile="gpt")
    await claim(conn)
    extra = {} if cooldown_max is None else {"cooldown_max": cooldown_max}
    failed = await one(
        conn, "fail_job", id=job_id, worker_id="w1", error_category="rate_limited", retry_after=WEEK, **extra
    )
    assert failed["run_at"] - failed["updated_at"] == WEEK  # the job itself waits as the provider asked
    assert bound - timedelta(seconds=1) < await cooldown_left(conn, "gpt") <= bound


async def test_a_rate_limited_failure_without_retry_after_cools_nothing_down(conn: Conn) -> None:
    (job_id,) = await jobs(conn, 1, model_profile="gpt")
    await claim(conn)
    await one(conn, "fail_job", id=job_id, worker_id="w1", error_category="rate_limited")
    assert await call(conn, "list_limits") == []


async def test_cool_down_called_directly_is_bounded_too(conn: Conn) -> None:
    await conn.execute("SELECT aiservice.cool_down('gpt', interval '7 days')")
    assert await cooldown_left(conn, "gpt") <= timedelta(minutes=5)
    await conn.execute("SELECT aiservice.cool_down('gpt', interval '7 days', interval '1 hour')")
    assert timedelta(minutes=59) < await cooldown_left(conn, "gpt") <= timedelta(hours=1)
    await conn.execute("SELECT aiservice.cool_down('gpt', interval '10 seconds')")  # never shortened
    assert await cooldown_left(conn, "gpt") > timedelta(minutes=59)


@pytest.mark.parametrize("bound", [timedelta(seconds=-1), timedelta(days=8)])
async def test_a_bad_cooldown_bound_is_refused(conn: Conn, bound: timedelta) -> None:
    (job_id,) = await jobs(conn, 1)
    await claim(conn)
    with pytest.raises(asyncpg.PostgresError) as refused:
        await conn.execute(
            "SELECT FROM aiservice.fail_job($1, 'w1', 'rate_limited', p_retry_after => '1 hour',"
            " p_cooldown_max => $2::interval)",
            job_id,
            bound,
        )
    assert refused.value.sqlstate == "AS422" and "cooldown_max" in str(refused.value)


SCOPE_FIELDS = {
    "task_type": {"paused", "max_running", "max_per_minute", "max_tokens_per_minute"},
    "model_profile": {"paused", "max_running", "max_per_minute", "max_tokens_per_minute", "cooldown", "cooldown_until"},
    "owner_service": {"paused", "max_running", "max_per_minute", "max_tokens_per_minute", "weight"},
}


async def test_the_fields_of_each_scope_are_equal_in_sql_and_python(conn: Conn) -> None:
    for scope, names in SCOPE_FIELDS.items():
        assert set(await conn.fetchval("SELECT aiservice.limit_fields($1)", scope)) == names
        assert set(rules.LIMIT_FIELDS[scope]) == names
