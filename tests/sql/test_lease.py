"""Leases (schema/functions/lease.sql): heartbeat_job, fencing by lease token, expire_leases."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

import asyncpg
from sqlapi import (
    CREATE_JOBS,
    JOB,
    Conn,
    Connections,
    call,
    claim,
    count,
    create,
    expire_lease,
    get,
    one,
    q,
    refused,
    refused_statement,
    running,
    together,
)


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


# --- The SQL API under concurrent callers on separate connections (SKIP LOCKED, idempotency, fencing).


async def test_concurrent_lease_expiry_returns_each_job_once(conn: Conn, connections: Connections) -> None:
    await conn.fetch(CREATE_JOBS, [{"owner_ref": str(i)} for i in range(500)], JOB)
    await conn.fetch("SELECT * FROM aiservice.claim_jobs('dead', 500)")
    await conn.execute("UPDATE aiservice.jobs SET lease_expires_at = now() - interval '1 second'")
    sweepers = await connections(4)
    results = await together([lambda c=c: c.fetch("SELECT id FROM aiservice.expire_leases()") for c in sweepers])
    expired = [r["id"] for rows in results for r in rows]
    assert len(expired) == len(set(expired)) == 500
    assert await conn.fetchval("SELECT count(*) FROM aiservice.jobs WHERE status = 'pending' AND attempts = 1") == 500


async def complete(c: Conn, job_id: int, worker: str, token: Any = None) -> str:
    try:
        await c.execute("SELECT id FROM aiservice.complete_job($1, $2, $3, $4)", job_id, worker, {"by": worker}, token)
    except asyncpg.PostgresError as exc:
        return str(exc.sqlstate)
    return "ok"


async def test_stale_worker_racing_a_reclaim_never_overwrites_the_new_result(
    conn: Conn, connections: Connections
) -> None:
    # The old worker completes just as its expired lease is taken over: either it wins and nobody
    # claims the job again, or the new worker wins and the old one is refused. Never both.
    stale, fresh = await connections(2)
    winners = Counter[str]()
    for i in range(30):
        job_id = await conn.fetchval("SELECT (r.job).id FROM aiservice.create_job('s', $1, 't', 'm') r", str(i))
        await conn.fetch("SELECT id FROM aiservice.claim_jobs('old', 1)")
        await conn.execute("UPDATE aiservice.jobs SET lease_expires_at = now() - interval '1 second'")
        old_outcome, claimed = await together(
            [
                lambda job_id=job_id: complete(stale, job_id, "old"),
                lambda: fresh.fetch("SELECT id, lease_token FROM aiservice.claim_jobs('new', 1)"),
            ]
        )
        if claimed:
            assert old_outcome == "AS410"
            assert claimed[0]["id"] == job_id
            assert await complete(fresh, job_id, "new", claimed[0]["lease_token"]) == "ok"
            assert await complete(stale, job_id, "old") == "AS410"
            winners["new"] += 1
        else:
            assert old_outcome == "ok"
            winners["old"] += 1
        row = await conn.fetchrow("SELECT status, result FROM aiservice.all_jobs WHERE id = $1", job_id)
        assert row["status"] == "completed"
        assert row["result"] == {"by": "new" if claimed else "old"}
    assert sum(winners.values()) == 30


# --- A caller reaching PostgreSQL directly through the SQL API cannot corrupt state.


async def snapshot(conn: Conn) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch("SELECT * FROM aiservice.all_jobs ORDER BY id")]


async def running_job(conn: Conn) -> asyncpg.Record:
    await conn.fetch(q("SELECT * FROM aiservice.create_job('guard', 'running', 'guard_t', 'm')"))
    rows = await conn.fetch("SELECT * FROM aiservice.claim_jobs('w1', 1, ARRAY['guard_t'])")
    job: asyncpg.Record = rows[0]
    return job


async def test_infinite_leases_are_refused(conn: Conn) -> None:
    """PostgreSQL 17+ has infinite intervals: a lease that never expires would hold a job forever."""
    if await conn.fetchval("SHOW server_version_num") < "170000":
        # Older servers reject 'infinity' as an interval before any function runs.
        await refused_statement(conn, "22007", "SELECT interval 'infinity'")
        return
    job = await running_job(conn)
    await conn.fetch(q("SELECT * FROM aiservice.create_job('guard', 'next', 'guard_t', 'm')"))
    before = await snapshot(conn)
    await refused_statement(conn, "AS422", "SELECT * FROM aiservice.claim_jobs('w2', 1, NULL, NULL, 'infinity')")
    await refused_statement(conn, "AS422", "SELECT aiservice.heartbeat_job($1, 'w1', 'infinity')", job["id"])
    await refused_statement(conn, "AS422", "SELECT aiservice.heartbeat_job($1, 'w1', '-infinity')", job["id"])
    await refused_statement(
        conn, "AS422", "SELECT * FROM aiservice.fail_job($1, 'w1', 'timeout', NULL, NULL, 'infinity')", job["id"]
    )
    assert await snapshot(conn) == before
