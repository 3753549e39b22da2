"""aiservice.claim_jobs and its steps (schema/functions/claim.sql): what a claim takes and in which order,
fair share between owners (fair_quota), limits as a claim meets them, what a claim reads, and
claimers racing on separate connections (SKIP LOCKED).

Real PostgreSQL; rows read are counted with PostgreSQL's statistics, never timed."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from sqlapi import (
    CREATE_JOBS,
    JOB,
    Conn,
    Connections,
    call,
    claim,
    count,
    create,
    create_jobs,
    expire_lease,
    get,
    jobs,
    one,
    refused,
    rows_read,
    running,
    set_limit,
    together,
)

from aiservice.db.store import JobStore


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


async def test_claim_sets_the_lease_and_counts_the_attempt(conn: Conn) -> None:
    job = await create(conn)
    (c,) = await claim(conn, "worker-a", lease_timeout=timedelta(minutes=3))
    assert c["id"] == job["id"]
    assert c["status"] == "running"
    assert c["worker_id"] == "worker-a"
    assert c["attempts"] == 1
    assert isinstance(c["lease_token"], uuid.UUID)
    assert c["started_at"] == c["updated_at"]
    assert c["lease_expires_at"] - c["started_at"] == timedelta(minutes=3)
    assert c["finished_at"] is None
    assert dict(await get(conn, job["id"])) == dict(c)
    await create(conn)
    (c,) = await claim(conn)
    assert c["lease_expires_at"] - c["started_at"] == timedelta(minutes=15)  # the default


async def test_claim_takes_highest_priority_then_oldest(conn: Conn) -> None:
    ids = {p: (await create(conn, owner_ref=f"p{p}", priority=p))["id"] for p in (0, 5, -1, 10)}
    second_five = (await create(conn, owner_ref="p5b", priority=5))["id"]
    order = []
    while claimed := await claim(conn):
        order.append(claimed[0]["id"])
    assert order == [ids[10], ids[5], second_five, ids[0], ids[-1]]
    # a claim of several takes the best of them
    rows = await create_jobs(conn, [{"owner_ref": str(p), "priority": p} for p in (1, 9, 3, 7, 5)], JOB)
    by_priority = {r["priority"]: r["id"] for r in rows}
    claimed = await claim(conn, limit=3)
    assert [r["id"] for r in claimed] == [by_priority[9], by_priority[7], by_priority[5]]  # returned in order


async def test_claim_respects_the_limit(conn: Conn) -> None:
    await create_jobs(conn, [{"owner_ref": str(i)} for i in range(5)], JOB)
    first = await claim(conn, limit=3)
    second = await claim(conn, limit=3)
    assert (len(first), len(second)) == (3, 2)
    assert not {r["id"] for r in first} & {r["id"] for r in second}
    assert await claim(conn, limit=3) == []
    assert len({r["lease_token"] for r in first + second}) == 5


async def test_claim_skips_jobs_that_are_not_due(conn: Conn) -> None:
    future = await create(conn, run_at=datetime.now(UTC) + timedelta(hours=1), priority=10)
    past = await create(conn, run_at=datetime(2020, 1, 1, tzinfo=UTC))
    assert [r["id"] for r in await claim(conn, limit=10)] == [past["id"]]
    assert await claim(conn) == []
    await conn.execute("UPDATE aiservice.jobs SET run_at = now() - interval '1 second' WHERE id = $1", future["id"])
    assert [r["id"] for r in await claim(conn)] == [future["id"]]


async def test_claim_takes_only_pending_jobs(conn: Conn) -> None:
    await _fleet(conn)  # one job of each status; tel_chat2 is the pending one
    claimed = await claim(conn, limit=10)
    assert [r["owner_ref"] for r in claimed] == ["call/2"]


async def test_claim_filters_by_task_type_and_model_profile(conn: Conn) -> None:
    kinds = [("llm_chat", "qwen"), ("llm_chat", "vision"), ("transcribe", "whisperx"), ("call_analysis", "qwen")]
    rows = await create_jobs(conn, [{"task_type": t, "model_profile": m} for t, m in kinds], JOB | {"priority": 0})
    ids = {(r["task_type"], r["model_profile"]): r["id"] for r in rows}

    async def claimed_kinds(**filters: Any) -> set[tuple[str, str]]:
        got = await claim(conn, limit=10, **filters)
        await conn.execute(
            "UPDATE aiservice.jobs SET status = 'pending', attempts = 0, worker_id = NULL, "
            "lease_token = NULL, lease_expires_at = NULL"
        )
        return {(r["task_type"], r["model_profile"]) for r in got}

    assert await claimed_kinds(task_types=["llm_chat"]) == {("llm_chat", "qwen"), ("llm_chat", "vision")}
    assert await claimed_kinds(model_profiles=["qwen"]) == {("llm_chat", "qwen"), ("call_analysis", "qwen")}
    assert await claimed_kinds(task_types=["llm_chat", "call_analysis"], model_profiles=["qwen"]) == {
        ("llm_chat", "qwen"),
        ("call_analysis", "qwen"),
    }
    assert await claimed_kinds(task_types=["transcribe"], model_profiles=["qwen"]) == set()
    assert await claimed_kinds(task_types=[]) == set()
    assert await claimed_kinds() == set(ids)


async def test_claim_validates_its_arguments(conn: Conn) -> None:
    await create(conn)
    for args in [
        {"worker_id": None},
        {"worker_id": ""},
        {"worker_id": "w" * 201},
        {"limit": 0},
        {"limit": -1},
        {"limit": 1001},
        {"limit": None},
        {"lease_timeout": timedelta(0)},
        {"lease_timeout": timedelta(seconds=-1)},
        {"lease_timeout": None},
    ]:
        await refused("AS422", call(conn, "claim_jobs", **({"worker_id": "w1", "limit": 1} | args)))
    assert await count(conn, "status = 'pending'") == 1


async def test_claim_returns_expired_jobs_to_the_queue_first(conn: Conn) -> None:
    first = await running(conn, "w1")
    await expire_lease(conn, first["id"])
    (again,) = await claim(conn, "w2")
    assert again["id"] == first["id"]
    assert (again["worker_id"], again["attempts"]) == ("w2", 2)
    assert again["lease_token"] != first["lease_token"]


# --- The scheduler: limits (pause, caps, per-minute starts and tokens, cool-down), fair share, claim cost.


async def complete(conn: Conn, job_id: int, worker: str = "w1", result: dict[str, Any] | None = None) -> None:
    await conn.execute("SELECT FROM aiservice.complete_job($1, $2, $3)", job_id, worker, result or {"ok": True})


async def drain_order(conn: Conn, batch: int = 1) -> list[str]:
    owners = []
    while got := await claim(conn, limit=batch):
        for row in got:
            owners.append(row["owner_service"])
            await complete(conn, row["id"])
    return owners


async def test_a_late_caller_is_not_stuck_behind_a_flood(conn: Conn) -> None:
    await jobs(conn, 300, owner_service="flood")
    await jobs(conn, 10, owner_service="late")
    order = await drain_order(conn, batch=10)
    last_late = max(i for i, owner in enumerate(order) if owner == "late")
    assert last_late < 25, order[:40]


async def test_weights_share_claims_between_three_owners(conn: Conn) -> None:
    for owner, weight in (("a", 1), ("b", 2), ("c", 3)):
        await jobs(conn, 100, owner_service=owner)
        await set_limit(conn, "owner_service", owner, weight=weight)
    order = await drain_order(conn)
    first = Counter(order[:60])
    assert (first["a"], first["b"], first["c"]) == (10, 20, 30)


async def test_owners_that_run_out_leave_their_share_to_the_others(conn: Conn) -> None:
    for owner, n in (("a", 100), ("b", 1), ("c", 5), ("d", 12)):
        await jobs(conn, n, owner_service=owner)
    got = Counter(r["owner_service"] for r in await claim(conn, limit=40))
    assert sum(got.values()) == 40 and (got["b"], got["c"], got["d"]) == (1, 5, 12)


async def test_an_owner_cap_is_filled_not_undercut(conn: Conn) -> None:
    for owner, n in (("a", 100), ("b", 1), ("c", 5), ("d", 12)):
        await jobs(conn, n, owner_service=owner)
    await set_limit(conn, "owner_service", "a", max_running=20)
    got = Counter(r["owner_service"] for r in await claim(conn, limit=40))
    assert got == {"a": 20, "b": 1, "c": 5, "d": 12}


async def test_fair_share_spanning_priorities_and_profiles_in_one_claim(conn: Conn) -> None:
    for profile in ("p1", "p2"):
        for priority in (0, 5):
            for owner in ("a", "b"):
                await jobs(conn, 3, owner_service=owner, model_profile=profile, priority=priority)
    assert len(await claim(conn, limit=24)) == 24
    served = await conn.fetch("SELECT model_profile, owner_service, served FROM aiservice.fair_share ORDER BY 1, 2")
    assert [(r["model_profile"], r["owner_service"], r["served"]) for r in served] == [
        ("p1", "a", 6.0),
        ("p1", "b", 6.0),
        ("p2", "a", 6.0),
        ("p2", "b", 6.0),
    ]


async def test_priority_comes_before_fair_share(conn: Conn) -> None:
    await jobs(conn, 5, owner_service="a")
    urgent = await create(conn, owner_service="b", priority=10)
    (first,) = await claim(conn)
    assert first["id"] == urgent["id"]


async def test_a_paused_owner_and_a_capped_task_type_bound_a_claim(conn: Conn) -> None:
    await jobs(conn, 3, owner_service="quiet")
    await jobs(conn, 5, owner_service="tel", task_type="transcribe")
    await jobs(conn, 5, owner_service="tel", task_type="llm_chat")
    await set_limit(conn, "owner_service", "quiet", paused=True)
    await set_limit(conn, "task_type", "transcribe", max_running=2)
    got = Counter((r["owner_service"], r["task_type"]) for r in await claim(conn, limit=20))
    assert got == {("tel", "transcribe"): 2, ("tel", "llm_chat"): 5}


FILL = """
INSERT INTO aiservice.jobs (owner_service, owner_ref, task_type, model_profile, run_at, scheduled)
SELECT 'bulk', 'r' || i, 'llm_chat', $2, now() + $3::interval, $3::interval > interval '0'
FROM generate_series(1, $1) i
"""


HOUR = timedelta(hours=1)


@pytest.mark.parametrize(("profile", "due_in"), [("A", HOUR), ("A", timedelta(0)), ("B", HOUR)])
async def test_a_claim_does_not_read_a_backlog_it_cannot_take(conn: Conn, profile: str, due_in: timedelta) -> None:
    """50,000 jobs not yet due, or due but of another profile: a claim for profile B reads a handful of rows."""
    await conn.execute(FILL, 50_000, profile, due_in)
    await jobs(conn, 3, model_profile="B", owner_service="live")
    await conn.execute("ANALYZE aiservice.jobs")
    before = await rows_read(conn)
    got = await claim(conn, limit=10, model_profiles=["B"])
    read = await rows_read(conn) - before
    assert len(got) == (3 if profile == "A" or due_in else 10)
    assert read < 100, read


async def test_claims_from_a_fresh_one_owner_backlog_read_a_handful_of_rows(conn: Conn) -> None:
    """20,000 jobs of one owner, never analyzed: each claim of 10 probes the claim index, it does not
    read the backlog (it once read every claimable row to find the owners). Eight claims on one
    connection, so the plans PL/pgSQL keeps after the fifth are covered too."""
    await conn.execute("ALTER TABLE aiservice.jobs SET (autovacuum_enabled = false)")  # no ANALYZE meanwhile
    await conn.execute(FILL, 20_000, "A", timedelta(0))
    reads = []
    for _ in range(8):
        before = await rows_read(conn)
        got = await claim(conn, limit=10)
        reads.append(await rows_read(conn) - before)
        assert len(got) == 10
    analyzed = await conn.fetchval(
        "SELECT analyze_count + autoanalyze_count FROM pg_stat_user_tables WHERE relid = 'aiservice.jobs'::regclass"
    )
    assert analyzed == 0
    assert max(reads) < 100, reads


async def test_scheduled_jobs_become_claimable_when_due(conn: Conn, store: JobStore) -> None:
    job = await create(conn, run_at=await conn.fetchval("SELECT now() + interval '1 hour'"))
    assert job["scheduled"] is True and job["status"] == "pending"
    assert await claim(conn) == []
    await conn.execute("UPDATE aiservice.jobs SET run_at = now() - interval '1 second' WHERE id = $1", job["id"])
    (got,) = await claim(conn)
    assert got["id"] == job["id"]
    retried = await one(conn, "fail_job", id=job["id"], worker_id="w1", error_category="timeout")
    assert retried["scheduled"] is True  # a backoff puts it out of the claim index again
    assert (await store.get_job(job["id"])).status == "pending"


# --- Claims under limits, where they used to go wrong: owners a claim cannot serve, starts counted per minute, a
# pause racing claims in flight, a provider's long retry_after, fields per scope.


async def hold_back(conn: Conn, held_by: str) -> list[str] | None:
    """Make every transcribe job unclaimable for the claims that follow; returns their task_types."""
    if held_by == "not_served":
        return ["llm_chat"]
    await set_limit(
        conn, "task_type", "transcribe", **({"paused": True} if held_by == "paused" else {"max_running": 0})
    )
    return None


@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize(("held_by", "owners"), [("not_served", 4), ("not_served", 16), ("paused", 16), ("capped", 4)])
async def test_owners_a_claim_cannot_serve_do_not_starve_the_others(
    conn: Conn, held_by: str, owners: int, batch: int
) -> None:
    for i in range(owners):  # older jobs than the victim's, at the same priority: first in line
        await jobs(conn, 3, owner_service=f"held{i:02}", task_type="transcribe", priority=5)
    await jobs(conn, 50, owner_service="victim", task_type="llm_chat", priority=5)
    await jobs(conn, 20, owner_service="low", task_type="llm_chat", priority=0)
    task_types = await hold_back(conn, held_by)
    taken: list[str] = []
    for _ in range(100):
        taken += [r["owner_service"] for r in await claim(conn, limit=batch, task_types=task_types)]
    assert taken.count("victim") == 50, f"{taken.count('victim')} of the victim's 50 jobs claimed"
    # Priority first: every priority-5 job the claims could take went before any priority-0 one.
    assert taken[:50] == ["victim"] * 50
    assert taken.count("low") == 20 and not any(o.startswith("held") for o in taken)


async def test_an_owner_left_without_claimable_jobs_mid_claim_leaves_the_rest_to_the_others(conn: Conn) -> None:
    """A task-type cap filled during the claim leaves later owners of that type nothing: they drop out."""
    for i in range(8):
        await jobs(conn, 2, owner_service=f"t{i}", task_type="transcribe")
    await jobs(conn, 10, owner_service="victim", task_type="llm_chat")
    await set_limit(conn, "task_type", "transcribe", max_running=1)
    got = [r["owner_service"] for r in await claim(conn, limit=10)]
    assert len(got) == 10 and got.count("victim") == 9


async def test_starts_are_stamped_when_the_claim_takes_them_not_when_its_transaction_began(
    conn: Conn, database_url: str
) -> None:
    await jobs(conn, 3, task_type="summarize")
    await set_limit(conn, "task_type", "summarize", max_per_minute=10)
    other = await asyncpg.connect(database_url)
    try:
        async with other.transaction():
            await other.execute("SELECT pg_sleep(0.05)")  # the transaction began earlier than the claim
            before = await other.fetchval("SELECT clock_timestamp()")
            assert len(await other.fetch("SELECT id FROM aiservice.claim_jobs('w2', 2)")) == 2
        stamps = await conn.fetch("SELECT at, starts FROM aiservice.limit_usage WHERE starts > 0")
        assert [r["starts"] for r in stamps] == [2]
        assert stamps[0]["at"] >= before
    finally:
        await other.close()


async def test_a_claim_in_a_long_transaction_does_not_open_a_second_minute(conn: Conn, database_url: str) -> None:
    """Five starts under a cap of five, made by a claim whose transaction began 5 s earlier. When those
    starts are 56 s old, no more may start; stamped with the transaction's start they would look
    61 s old and five more would go. (4 s of margin for a loaded machine between the two claims.)"""
    await jobs(conn, 20, task_type="summarize")
    await set_limit(conn, "task_type", "summarize", max_per_minute=5)
    other = await asyncpg.connect(database_url)
    try:
        async with other.transaction():
            await other.execute("SELECT pg_sleep(5)")
            assert len(await other.fetch("SELECT id FROM aiservice.claim_jobs('w2', 10)")) == 5
        await conn.execute("UPDATE aiservice.limit_usage SET at = at - interval '56 seconds'")
        assert await claim(conn, limit=10) == []
        started = await conn.fetchval("SELECT count(*) FROM aiservice.all_jobs WHERE status = 'running'")
        assert started == 5
    finally:
        await other.close()


async def blocked_by(conn: Conn, waiter: int, holder: int, task: asyncio.Task[Any]) -> bool:
    """Whether ``waiter`` ends up waiting for ``holder`` before ``task`` finishes (5 s at most)."""
    for _ in range(500):
        if task.done():
            return False
        if holder in await conn.fetchval("SELECT pg_blocking_pids($1)", waiter):
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.mark.parametrize("existing", [None, {"max_tokens_per_minute": 1000}, {"paused": False}])
async def test_a_pause_waits_for_claims_in_flight(
    conn: Conn, database_url: str, existing: dict[str, Any] | None
) -> None:
    await jobs(conn, 5, task_type="transcribe")
    if existing is not None:
        await set_limit(conn, "task_type", "transcribe", **existing)
    claimer = await asyncpg.connect(database_url)
    pauser = await asyncpg.connect(database_url)
    try:
        tx = claimer.transaction()
        await tx.start()
        assert len(await claimer.fetch("SELECT id FROM aiservice.claim_jobs('w1', 1)")) == 1
        pause = asyncio.create_task(
            pauser.fetch("SELECT * FROM aiservice.set_limit('task_type', 'transcribe', '{\"paused\": true}')")
        )
        # The claim has not committed: the pause must not commit before it (nor answer its caller).
        blocked = await blocked_by(conn, pauser.get_server_pid(), claimer.get_server_pid(), pause)
        await tx.commit()
        await asyncio.wait_for(pause, 5)
        assert blocked, "the pause committed while a claim that started a job of its scope was in flight"
        assert await claim(conn, limit=10) == []
        assert await conn.fetchval("SELECT count(*) FROM aiservice.all_jobs WHERE status = 'running'") == 1
    finally:
        await claimer.close()
        await pauser.close()


# --- The claim's short cut (one owner at a priority level that no owner or task type limit restricts) gives the
# scheduler's answers.


PROFILES = ["A", "B", "C"]


OWNERS = ["o1", "o2", "o3"]


TASKS = ["t1", "t2"]


async def backlog(conn: Conn, rng: random.Random, n: int) -> None:
    """Jobs spread over profiles, priorities, owners and task types; some of one owner only per level."""
    specs = []
    for i in range(n):
        profile = rng.choice(PROFILES)
        # Profile C has one owner: its levels always take the short cut.
        owner = "o1" if profile == "C" else rng.choice(OWNERS[: rng.choice([1, 1, 3])])
        specs.append(
            {
                "owner_ref": f"r{i}",
                "owner_service": owner,
                "task_type": rng.choice(TASKS),
                "model_profile": profile,
                "priority": rng.choice([0, 0, 5, 9]),
            }
        )
    await create_jobs(conn, specs)


FULL = "('task_type', 'other', 1)"  # caps no job here, but no claim takes the short cut beside it


async def claims(conn: Conn, script: list[dict[str, Any]], limits: list[str]) -> list[list[int]]:
    """The ids each claim of `script` returns, in order, under `limits` (scope, name, max_running);
    nothing is kept."""
    tx = conn.transaction()
    await tx.start()
    try:
        if limits:
            await conn.execute(f"INSERT INTO aiservice.limits (scope, name, max_running) VALUES {', '.join(limits)}")
        return [[r["id"] for r in await claim(conn, **step)] for step in script]
    finally:
        await tx.rollback()


@pytest.mark.parametrize("limits", [[], ["('model_profile', 'A', 6)", "('owner_service', 'o2', 4)"]])
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
async def test_the_short_cut_takes_what_the_scheduler_takes(conn: Conn, seed: int, limits: list[str]) -> None:
    rng = random.Random(seed)
    await backlog(conn, rng, 120)
    script = [
        {
            "worker": f"w{i}",
            "limit": rng.choice([1, 3, 7, 20]),
            "task_types": rng.choice([None, None, ["t1"], ["t2"]]),
            "model_profiles": rng.choice([None, None, ["A"], ["C"], ["B", "C"]]),
        }
        for i in range(12)
    ]
    fast = await claims(conn, script, limits)
    full = await claims(conn, script, [*limits, FULL])
    assert fast == full
    assert sum(map(len, fast)) > 0


async def table_reads(conn: Conn, table: str) -> int:
    n = await conn.fetchval(
        "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) + n_tup_ins + n_tup_upd"
        " FROM pg_stat_xact_user_tables WHERE relid = $1::regclass",
        table,
    )
    return int(n)


async def test_a_one_owner_claim_without_limits_leaves_fair_share_alone(conn: Conn) -> None:
    """Nothing for fair share to decide or record: the claim neither reads nor writes fair_share."""
    await jobs(conn, 30)
    tx = conn.transaction()
    await tx.start()
    try:
        got = await claim(conn, limit=10)
        assert len(got) == 10
        assert await table_reads(conn, "aiservice.fair_share") == 0
    finally:
        await tx.rollback()


# --- The weighted-fair quota (aiservice.fair_quota), called with plain SELECTs: how many of a claim's jobs each
# owner at a priority level gets, from its service so far, its weight and the lag floor.


# (served, got, weights, floor, take) -> quotas, as SQL literals so that each case is the SELECT
# one would type in psql.
CASES = [
    # equal owners share equally; an odd job goes to the owner earlier in the arrays
    ("'{0,0}'", "'{0,0}'", "'{1,1}'", "0", "4", [2, 2]),
    ("'{0,0}'", "'{0,0}'", "'{1,1}'", "0", "3", [2, 1]),
    ("'{0,0,0}'", "'{0,0,0}'", "'{1,1,1}'", "0", "1", [1, 0, 0]),
    # weight 2 gets twice the jobs; weight 3 three times, ties at whole units to the earlier owner
    ("'{0,0}'", "'{0,0}'", "'{1,2}'", "0", "6", [2, 4]),
    ("'{0,0}'", "'{0,0}'", "'{3,1}'", "0", "8", [6, 2]),
    # debt: the owner served less is served first until it has caught up
    ("'{5,0}'", "'{0,0}'", "'{1,1}'", "0", "4", [0, 4]),
    ("'{5,0}'", "'{0,0}'", "'{1,1}'", "0", "7", [1, 6]),
    ("'{2.5,0}'", "'{0,0}'", "'{1,2}'", "0", "5", [0, 5]),
    ("'{2.5,0}'", "'{0,0}'", "'{1,2}'", "0", "6", [1, 5]),
    # the lag floor: an owner far behind counts as served up to the floor, no less
    ("'{20,0}'", "'{0,0}'", "'{1,1}'", "10", "12", [1, 11]),
    ("'{20,0}'", "'{0,0}'", "'{1,1}'", "10", "30", [10, 20]),
    # jobs already taken at this level in earlier passes count
    ("'{0,0}'", "'{3,0}'", "'{1,1}'", "0", "3", [0, 3]),
    ("'{0,0}'", "'{2,0}'", "'{1,2}'", "0", "4", [0, 4]),
    # an owner that is out (served NULL) gets nothing; the others share its part
    ("'{NULL,0,0}'", "'{0,0,0}'", "'{1,1,1}'", "0", "4", [0, 2, 2]),
    ("'{NULL,NULL}'", "'{0,0}'", "'{1,1}'", "0", "5", [0, 0]),
    # one owner takes all; nothing to take, nobody to give to
    ("'{7}'", "'{0}'", "'{4}'", "0", "9", [9]),
    ("'{0,0}'", "'{0,0}'", "'{1,1}'", "0", "0", [0, 0]),
    ("'{}'", "'{}'", "'{}'", "0", "5", []),
]


async def test_fair_quota_is_weighted_fair_queueing_in_plain_selects(conn: Conn) -> None:
    for served, got, weights, floor, take, want in CASES:
        sql = f"SELECT aiservice.fair_quota({served}, {got}, {weights}, {floor}, {take})"
        assert await conn.fetchval(sql) == want, sql


async def test_fair_quota_is_immutable(conn: Conn) -> None:
    volatility = await conn.fetchval(
        "SELECT provolatile::text FROM pg_proc"
        " WHERE oid = 'aiservice.fair_quota(float8[], integer[], integer[], float8, bigint)'::regprocedure"
    )
    assert volatility == "i"


def one_at_a_time(served: list[float | None], got: list[int], weights: list[int], floor: float, take: int) -> list[int]:
    """The rule as the claim once ran it: each job to the least-served owner in turn, ties to the earlier."""
    quota = [0] * len(served)
    for _ in range(take):
        best = None
        for i, s in enumerate(served):
            if s is None:
                continue
            key = max(s, floor) + (got[i] + quota[i]) / weights[i]
            if best is None or key < best[0]:
                best = (key, i)
        if best is None:
            break
        quota[best[1]] += 1
    return quota


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_fair_quota_hands_out_jobs_one_at_a_time_to_the_least_served(conn: Conn, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(100):
        n = rng.randint(1, 5)
        served = [None if rng.random() < 0.15 else rng.choice([0.0, 0.5, 1.0, 2.0 / 3, 3.25, 12.0]) for _ in range(n)]
        got = [rng.randint(0, 4) for _ in range(n)]
        weights = [rng.choice([1, 1, 2, 3, 7]) for _ in range(n)]
        floor = rng.choice([0.0, 0.0, 1.5, 2.0])
        take = rng.randint(0, 25)
        quota = await conn.fetchval(
            "SELECT aiservice.fair_quota($1::float8[], $2::integer[], $3::integer[], $4::float8, $5::bigint)",
            served,
            got,
            weights,
            floor,
            take,
        )
        assert quota == one_at_a_time(served, got, weights, floor, take), (served, got, weights, floor, take)
        assert sum(quota) == (take if any(s is not None for s in served) else 0)


# --- The SQL API under concurrent callers on separate connections (SKIP LOCKED, idempotency, fencing).


async def test_eight_claimers_never_receive_the_same_job_twice(conn: Conn, connections: Connections) -> None:
    jobs = [{"owner_ref": f"call/{i}", "priority": i % 7} for i in range(2_000)]
    created = {r["id"] for r in await conn.fetch(CREATE_JOBS, jobs, JOB)}
    assert len(created) == 2_000
    claimers = await connections(8)

    async def claim_until_empty(c: Conn, worker: str) -> list[tuple[int, str, int]]:
        got: list[tuple[int, str, int]] = []
        while rows := await c.fetch("SELECT * FROM aiservice.claim_jobs($1, 25)", worker):
            got.extend((r["id"], r["worker_id"], r["attempts"]) for r in rows)
        return got

    results = await together([lambda c=c, i=i: claim_until_empty(c, f"w{i}") for i, c in enumerate(claimers)])

    claimed = [job_id for got in results for job_id, _, _ in got]
    duplicates = [job_id for job_id, n in Counter(claimed).items() if n > 1]
    assert duplicates == []
    assert set(claimed) == created
    for i, got in enumerate(results):
        assert all(worker == f"w{i}" and attempts == 1 for _, worker, attempts in got)
    assert sum(1 for got in results if got) > 1, "the claimers did not overlap at all"
    rows = await conn.fetch("SELECT id, worker_id, attempts, status FROM aiservice.all_jobs")
    owner = {job_id: f"w{i}" for i, got in enumerate(results) for job_id, _, _ in got}
    assert all(r["status"] == "running" and r["attempts"] == 1 and r["worker_id"] == owner[r["id"]] for r in rows)


async def test_concurrent_claimers_and_completers_finish_every_job_once(conn: Conn, connections: Connections) -> None:
    await conn.fetch(CREATE_JOBS, [{"owner_ref": str(i)} for i in range(400)], JOB)
    workers = await connections(6)

    async def work(c: Conn, worker: str) -> int:
        done = 0
        while rows := await c.fetch("SELECT id, lease_token FROM aiservice.claim_jobs($1, 5)", worker):
            for r in rows:
                await c.execute(
                    "SELECT id FROM aiservice.complete_job($1, $2, $3, $4)",
                    r["id"],
                    worker,
                    {"by": worker},
                    r["lease_token"],
                )
                done += 1
        return done

    done = await together([lambda c=c, i=i: work(c, f"w{i}") for i, c in enumerate(workers)])
    assert sum(done) == 400
    rows = await conn.fetch("SELECT status, worker_id, result, attempts FROM aiservice.all_jobs")
    assert all(r["status"] == "completed" and r["result"] == {"by": r["worker_id"]} for r in rows)
    assert all(r["attempts"] == 1 for r in rows)


async def test_capped_claimers_of_batch_jobs_never_deadlock(conn: Conn, connections: Connections) -> None:
    """Eight claimers under one max_running cap, on jobs that belong to batches, while jobs complete,
    fail and have their leases expire: a claim's housekeeping and its claim move batch counts, and
    batch counts never hold a lock that a claim waits on, so no deadlock, and the counts stay exact."""
    await conn.fetch(
        "SELECT FROM aiservice.set_limit('model_profile', $1, $2)", JOB["model_profile"], {"max_running": 3}
    )
    for b in range(60):
        await conn.fetch(CREATE_JOBS, [{"owner_ref": f"{b}/{i}", "max_attempts": 2} for i in range(30)], JOB)
    claimers = await connections(8)
    errors: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    most_running = 0
    loop = asyncio.get_running_loop()
    # At least 3 s of churn, longer on a slow machine until each outcome happened often enough.
    start = loop.time()

    def churning() -> bool:
        enough = min(outcomes[k] for k in ("complete", "fail", "expire")) > 20
        return loop.time() < start + 60 and (loop.time() < start + 3 or not enough)

    async def claimer(c: Conn, i: int) -> None:
        n = 0
        while churning():
            n += 1
            try:
                rows = await c.fetch("SELECT * FROM aiservice.claim_jobs($1, 2, p_lease_timeout => '40 ms')", f"w{i}")
                for r in rows:
                    kind = ("complete", "fail", "expire")[(n + r["id"]) % 3]
                    if kind == "complete":
                        await c.execute(
                            "SELECT id FROM aiservice.complete_job($1, $2, '{}', $3)",
                            r["id"],
                            f"w{i}",
                            r["lease_token"],
                        )
                    elif kind == "fail":
                        await c.execute(
                            "SELECT id FROM aiservice.fail_job($1, $2, 'provider_error', 'x', true, '5 ms', $3)",
                            r["id"],
                            f"w{i}",
                            r["lease_token"],
                        )
                    outcomes[kind] += 1
            except asyncpg.PostgresError as exc:
                errors[str(exc.sqlstate)] += 1  # AS410: a lease expired before the worker finished

    async def sampler() -> None:
        nonlocal most_running
        while churning():
            running = await conn.fetchval("SELECT count(*) FROM aiservice.all_jobs WHERE status = 'running'")
            most_running = max(most_running, running)
            await asyncio.sleep(0.01)

    await asyncio.gather(sampler(), *(claimer(c, i) for i, c in enumerate(claimers)))
    assert errors["40P01"] == 0, errors
    assert set(errors) <= {"AS410"}, errors
    assert min(outcomes[k] for k in ("complete", "fail", "expire")) > 20, outcomes
    assert most_running <= 3
    wrong = await conn.fetch(
        """
        SELECT b.id FROM aiservice.batches b
        JOIN (SELECT batch_id, count(*) AS total,
                     count(*) FILTER (WHERE status = 'pending') AS pending,
                     count(*) FILTER (WHERE status = 'running') AS running,
                     count(*) FILTER (WHERE status = 'completed') AS completed,
                     count(*) FILTER (WHERE status = 'failed') AS failed,
                     count(*) FILTER (WHERE status = 'cancelled') AS cancelled
              FROM aiservice.all_jobs GROUP BY batch_id) c ON c.batch_id = b.id
        WHERE (b.total, b.pending, b.running, b.completed, b.failed, b.cancelled)
              <> (c.total, c.pending, c.running, c.completed, c.failed, c.cancelled)
        """
    )
    assert wrong == []
