"""The claim's short cut (one owner at a priority level that no owner or task type limit restricts)
gives the scheduler's answers.

The same backlog is claimed several times, each in a transaction rolled back afterwards: with limit
rows that leave the short cut open (none; a profile cap), and with the same plus a task type cap
that governs none of these jobs but sends every claim through the full scheduler. Real PostgreSQL."""

from __future__ import annotations

import random
from typing import Any, TypeAlias

import asyncpg
import pytest
from sqlapi import claim, create_jobs, jobs

Conn: TypeAlias = "asyncpg.Connection[Any]"

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
