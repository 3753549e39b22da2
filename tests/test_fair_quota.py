"""The weighted-fair quota (aiservice.fair_quota), called with plain SELECTs: how many of a claim's
jobs each owner at a priority level gets, from its service so far, its weight and the lag floor.

Real PostgreSQL; the function is IMMUTABLE arithmetic, so no table is involved."""

from __future__ import annotations

import random
from typing import Any, TypeAlias

import asyncpg
import pytest

Conn: TypeAlias = "asyncpg.Connection[Any]"

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
