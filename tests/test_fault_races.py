"""Races on the SQL API: claim, heartbeat, complete, fail, release, cancel, retry and lease expiry on
the same few jobs from many connections at once, by a seeded random schedule.

Every call either succeeds or is refused with a documented SQLSTATE (never a deadlock, a
constraint violation or any other error). An audit trigger records every transition; on that
history: a claim only ever takes a pending job, a running job changes hands only through a new
claim, every change of a running job is made with a lease token that a claim gave to that very
worker, a completed or cancelled job never changes again, and attempts never exceed max_attempts."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest
from audit import audit_rows, install_audit

from aiservice.db.pool import connect

ACTORS = 10
OPS_PER_ACTOR = 80
JOBS = 40
DOCUMENTED = {"AS404", "AS409", "AS410", "AS422"}
CATEGORIES = ["timeout", "provider_error", "invalid_input", "output_invalid", "rate_limited"]


@dataclass
class Ledger:
    claimed: dict[UUID, str] = field(default_factory=dict)  # lease token -> worker it was given to
    completes: Counter[int] = field(default_factory=Counter)  # job id -> successful complete calls
    outcomes: Counter[str] = field(default_factory=Counter)  # "op:ok" / "op:SQLSTATE"
    unexpected: list[str] = field(default_factory=list)


async def actor(conn: asyncpg.Connection[Any], index: int, seed: int, ids: list[int], ledger: Ledger) -> None:
    rng = random.Random(seed * 1000 + index)
    me = f"w{index}"
    held: dict[int, UUID] = {}  # what this worker believes it runs
    surrendered: list[tuple[int, UUID]] = []  # leases it gave up or lost: using them must be refused

    async def call(op: str, sql: str, *args: Any) -> list[asyncpg.Record] | None:
        try:
            rows = await conn.fetch(sql, *args)
        except asyncpg.PostgresError as exc:
            state = exc.sqlstate or "?"
            ledger.outcomes[f"{op}:{state}"] += 1
            if state not in DOCUMENTED:
                ledger.unexpected.append(f"{op} {args}: {state} {exc}")
            return None
        ledger.outcomes[f"{op}:ok"] += 1
        return rows

    for _ in range(OPS_PER_ACTOR):
        op = rng.choices(
            ["claim", "complete", "fail", "heartbeat", "release", "stale", "cancel", "retry", "expire"],
            weights=[8, 2, 3, 3, 1, 2, 1, 2, 1],
        )[0]
        job_id = rng.choice(ids)
        if held and op in ("complete", "fail", "heartbeat", "release"):
            job_id, token = rng.choice(sorted(held.items()))
        else:
            token = uuid4()
        if op == "claim":
            lease = timedelta(milliseconds=rng.choice([30, 200, 10_000]))
            rows = await call(
                op,
                "SELECT * FROM aiservice.claim_jobs($1, $2, ARRAY['race'], NULL, $3::interval)",
                me,
                rng.randint(1, 3),
                lease,
            )
            for row in rows or []:
                ledger.claimed[row["lease_token"]] = me
                old = held.pop(row["id"], None)
                if old is not None:
                    surrendered.append((row["id"], old))
                held[row["id"]] = row["lease_token"]
        elif op == "complete":
            rows = await call(
                op, "SELECT * FROM aiservice.complete_job($1, $2, $3::jsonb, $4)", job_id, me, {"by": me}, token
            )
            if rows is not None:
                ledger.completes[job_id] += 1
            if job_id in held and held[job_id] == token:
                surrendered.append((job_id, held.pop(job_id)))
        elif op == "fail":
            await call(
                op,
                "SELECT * FROM aiservice.fail_job($1, $2, $3, 'race', NULL, interval '0', $4)",
                job_id,
                me,
                rng.choice(CATEGORIES),
                token,
            )
            if job_id in held and held[job_id] == token:
                surrendered.append((job_id, held.pop(job_id)))
        elif op == "heartbeat":
            rows = await call(
                op, "SELECT aiservice.heartbeat_job($1, $2, interval '200 milliseconds', $3)", job_id, me, token
            )
            if rows is None and held.get(job_id) == token:
                surrendered.append((job_id, held.pop(job_id)))
        elif op == "release":
            await call(op, "SELECT * FROM aiservice.release_job($1, $2, $3)", job_id, me, token)
            if job_id in held and held[job_id] == token:
                surrendered.append((job_id, held.pop(job_id)))
        elif op == "stale":
            if surrendered:
                job_id, token = rng.choice(surrendered)
            rows = await call(
                op, "SELECT * FROM aiservice.complete_job($1, $2, '{\"stale\": true}', $3)", job_id, me, token
            )
            if rows is not None:
                ledger.unexpected.append(f"a surrendered or made-up lease completed job {job_id}")
        elif op == "cancel":
            if rng.random() < 0.5:
                await call(op, "SELECT * FROM aiservice.cancel_job($1)", job_id)
            else:
                await call(op, "SELECT * FROM aiservice.cancel_jobs(p_ids => $1::bigint[])", rng.sample(ids, 3))
        elif op == "retry":
            if rng.random() < 0.5:
                await call(op, "SELECT * FROM aiservice.retry_job($1)", job_id)
            else:
                await call(op, "SELECT * FROM aiservice.retry_jobs(p_ids => $1::bigint[])", rng.sample(ids, 3))
        elif op == "expire":
            await call(op, "SELECT * FROM aiservice.expire_leases()")
        await asyncio.sleep(rng.random() * 0.004)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_racing_lifecycle_calls_keep_every_invariant(database_url: str, seed: int) -> None:
    await install_audit(database_url)
    conns = [await connect(database_url) for _ in range(ACTORS)]
    try:
        rows = await conns[0].fetch(
            "SELECT (r.job).id FROM aiservice.create_jobs("
            "  (SELECT jsonb_agg(jsonb_build_object('owner_ref', 'race/' || n)) FROM generate_series(1, $1) n),"
            '  \'{"owner_service": "race", "task_type": "race", "model_profile": "m", "max_attempts": 3}\''
            ") r",
            JOBS,
        )
        ids = [r["id"] for r in rows]
        ledger = Ledger()
        await asyncio.gather(*(actor(conn, i, seed, ids, ledger) for i, conn in enumerate(conns)))
        final = {r["id"]: r for r in await conns[0].fetch("SELECT * FROM aiservice.all_jobs")}
    finally:
        for conn in conns:
            await conn.close()
    history = await audit_rows(database_url)

    assert not ledger.unexpected, ledger.unexpected[:5]
    # The schedule really raced: claims, refusals and finishes all happened.
    for needed in ("claim:ok", "complete:ok", "fail:ok", "stale:AS410", "cancel:ok", "retry:ok"):
        assert ledger.outcomes[needed] > 0, (needed, ledger.outcomes)
    assert any(h["new_status"] == "pending" and h["old_status"] == "running" for h in history), "no lease ever moved"

    for h in history:
        assert 0 <= h["attempts"] <= h["max_attempts"], dict(h)
        # A claim takes only a pending job; nothing else ever makes a job running.
        if h["new_status"] == "running" and h["old_status"] != "running":
            assert h["old_status"] == "pending", dict(h)
            assert ledger.claimed.get(h["new_token"]) == h["new_worker"], dict(h)
        # A running job keeps its lease (heartbeat) or gives it up: never two holders at once.
        if h["old_status"] == "running" and h["new_status"] == "running":
            assert (h["old_token"], h["old_worker"]) == (h["new_token"], h["new_worker"]), dict(h)
        # Every change of a running job starts from a lease a claim gave to that worker.
        if h["old_status"] == "running":
            assert ledger.claimed.get(h["old_token"]) == h["old_worker"], dict(h)
        # Completed and cancelled are final.
        assert h["old_status"] not in ("completed", "cancelled"), dict(h)

    completions = Counter(h["id"] for h in history if h["new_status"] == "completed")
    for job_id, row in final.items():
        status = row["status"]
        assert (row["result"] is not None) == (status == "completed"), dict(row)
        assert (row["lease_token"] is not None) == (status == "running"), dict(row)
        assert completions[job_id] == ledger.completes[job_id] == (1 if status == "completed" else 0), job_id
        assert row["attempts"] <= row["max_attempts"]
    calls = sum(ledger.outcomes.values())
    print(f"seed {seed}: {calls} calls, {len(history)} transitions, {dict(sorted(ledger.outcomes.items()))}")
