"""Dependencies between jobs (schema/functions/pipelines.sql): a dependent waits, failures cascade, a claim
carries its dependencies' results (bounded), and what a completion reads."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from sqlapi import Conn, claim, create, create_jobs, rows_read

from aiservice.db.store import JobStore

# --- Pipelines: jobs that wait for other jobs and use their results.


LEASE = timedelta(minutes=5)


async def sql_jobs(conn: Conn, jobs: list[dict[str, Any]]) -> list[asyncpg.Record]:
    return await create_jobs(conn, jobs, {"owner_service": "telephony", "task_type": "t", "model_profile": "m"})


async def complete(conn: Conn, job_id: int, result: dict[str, Any]) -> None:
    await conn.execute("SELECT FROM aiservice.complete_job($1, 'w1', $2)", job_id, result)


async def fail(conn: Conn, job_id: int) -> None:
    await conn.execute("SELECT FROM aiservice.fail_job($1, 'w1', 'invalid_input', 'bad', false)", job_id)


async def status(conn: Conn, job_id: int) -> tuple[str, bool, str | None, str | None]:
    row = await conn.fetchrow(
        "SELECT status::text, blocked, error_category, error_message FROM aiservice.all_jobs WHERE id = $1", job_id
    )
    assert row is not None
    return row["status"], row["blocked"], row["error_category"], row["error_message"]


async def test_a_dependent_waits_and_its_claim_carries_the_results(conn: Conn) -> None:
    first, second = await sql_jobs(conn, [{"owner_ref": "a"}, {"owner_ref": "b", "depends_on": ["$0"]}])
    assert (first["blocked"], second["blocked"], second["status"]) == (False, True, "pending")
    (claimed,) = await claim(conn, limit=10)
    assert claimed["id"] == first["id"]
    await complete(conn, first["id"], {"text": "transcript"})
    (rows,) = [await conn.fetch("SELECT (r.job).id, r.dependencies FROM aiservice.claim_jobs_v2('w1', 10) r")]
    assert [r["id"] for r in rows] == [second["id"]]
    assert rows[0]["dependencies"] == [
        {
            "id": first["id"],
            "task_type": "t",
            "model_profile": "m",
            "status": "completed",
            "result": {"text": "transcript"},
        }
    ]


async def test_failure_cascades_down_the_pipeline(conn: Conn) -> None:
    a, b, c = await sql_jobs(conn, [{"owner_ref": "a"}, {"owner_ref": "b", "depends_on": ["$0"]},
                                    {"owner_ref": "c", "depends_on": ["$1"]}])  # fmt: skip
    await claim(conn)
    await fail(conn, a["id"])
    assert await claim(conn, limit=10) == []  # resolves: b fails, then c
    await conn.execute("SELECT aiservice.maintain()")
    assert await status(conn, b["id"]) == ("failed", False, "dependency_failed", f"dependency {a['id']} is failed")
    assert await status(conn, c["id"]) == ("failed", False, "dependency_failed", f"dependency {b['id']} is failed")

    # Retrying the whole pipeline runs it again: the dependents wait for the retried dependency.
    await conn.fetch("SELECT * FROM aiservice.retry_jobs(p_ids => $1)", [a["id"], b["id"], c["id"]])
    assert [(await status(conn, j["id"]))[:2] for j in (a, b, c)] == [("pending", False), ("pending", True),
                                                                        ("pending", True)]  # fmt: skip
    for job in (a, b, c):
        (got,) = await claim(conn, limit=10)
        assert got["id"] == job["id"]
        await complete(conn, job["id"], {"ok": True})


async def test_a_cancelled_dependency_fails_its_dependents(conn: Conn) -> None:
    a, b = await sql_jobs(conn, [{"owner_ref": "a"}, {"owner_ref": "b", "depends_on": ["$0"]}])
    await conn.execute("SELECT FROM aiservice.cancel_job($1)", a["id"])
    await conn.execute("SELECT aiservice.maintain()")
    assert await status(conn, b["id"]) == ("failed", False, "dependency_failed", f"dependency {a['id']} is cancelled")


async def test_one_resolve_pass_fails_a_whole_chain_and_unblocks_only_direct_dependents(conn: Conn) -> None:
    chain = await sql_jobs(conn, [{"owner_ref": "c0"}] + [{"owner_ref": f"c{i}", "depends_on": [f"${i - 1}"]}
                                                          for i in range(1, 1000)])  # fmt: skip
    done = await sql_jobs(conn, [{"owner_ref": "d0"}, {"owner_ref": "d1", "depends_on": ["$0"]},
                                 {"owner_ref": "d2", "depends_on": ["$1"]}])  # fmt: skip
    await conn.execute("SELECT FROM aiservice.cancel_job($1)", chain[0]["id"])
    assert await conn.fetchval("SELECT aiservice.resolve_dependencies()") == 1  # one pass
    rows = await conn.fetch(
        "SELECT id, status::text, blocked, error_category, error_message FROM aiservice.all_jobs"
        " WHERE id = ANY ($1) ORDER BY id",
        [j["id"] for j in chain[1:]],
    )
    assert [(r["status"], r["blocked"], r["error_category"]) for r in rows] == [
        ("failed", False, "dependency_failed")
    ] * 999
    assert rows[0]["error_message"] == f"dependency {chain[0]['id']} is cancelled"
    assert rows[-1]["error_message"] == f"dependency {chain[-2]['id']} is failed"

    # Completing a job unblocks its direct dependents only: the next waits for them to complete.
    (got,) = await claim(conn, limit=1)
    assert got["id"] == done[0]["id"]
    await complete(conn, done[0]["id"], {"ok": True})
    assert await conn.fetchval("SELECT aiservice.resolve_dependencies()") >= 1
    assert [(await status(conn, j["id"]))[:2] for j in done[1:]] == [("pending", False), ("pending", True)]
    assert await conn.fetchval("SELECT count(*) FROM aiservice.finished_dependencies") == 0


async def test_a_dependent_cancelled_before_the_pass_is_not_failed_again(conn: Conn) -> None:
    """a <- x <- y: x is cancelled, then a; one pass sees both. x stays cancelled, and y fails
    naming x as cancelled (x's own finish), not as failed by a cascade through it."""
    a, x, y = await sql_jobs(conn, [{"owner_ref": "a"}, {"owner_ref": "x", "depends_on": ["$0"]},
                                    {"owner_ref": "y", "depends_on": ["$1"]}])  # fmt: skip
    await conn.execute("SELECT FROM aiservice.cancel_job($1)", x["id"])
    await conn.execute("SELECT FROM aiservice.cancel_job($1)", a["id"])
    assert await conn.fetchval("SELECT aiservice.resolve_dependencies()") == 2
    assert (await status(conn, x["id"]))[0] == "cancelled"
    message = await conn.fetchval("SELECT error_message FROM aiservice.all_jobs WHERE id = $1", y["id"])
    assert message == f"dependency {x['id']} is cancelled"


async def test_a_job_may_depend_on_finished_jobs_made_earlier(conn: Conn) -> None:
    done = await create(conn)
    (got,) = await claim(conn, limit=10)
    await complete(conn, got["id"], {"text": "earlier"})
    later = await create(conn, depends_on=[done["id"]])
    assert later["blocked"] is True
    (claimed,) = await claim(conn, limit=10)  # the claim resolves it first
    assert claimed["id"] == later["id"]


@pytest.mark.parametrize(
    ("jobs", "reason"),
    [
        ([{"owner_ref": "a", "depends_on": ["$0"]}], "cannot depend on itself"),
        ([{"owner_ref": "a", "depends_on": ["$1"]}, {"owner_ref": "b", "depends_on": ["$0"]}], "forms a cycle"),
        (
            [
                {"owner_ref": "a", "depends_on": ["$1"]},
                {"owner_ref": "b", "depends_on": ["$2"]},
                {"owner_ref": "c", "depends_on": ["$0"]},
            ],
            "forms a cycle",
        ),
        ([{"owner_ref": "a", "depends_on": ["$5"]}], "expected a job id"),
        ([{"owner_ref": "a", "depends_on": [987654321]}], "do not exist"),
        ([{"owner_ref": "a", "depends_on": "$0"}], "must be a list"),
        ([{"owner_ref": "a", "depends_on": [1.5]}], "expected a job id"),
    ],
)
async def test_bad_dependencies_are_refused(conn: Conn, jobs: list[dict[str, Any]], reason: str) -> None:
    with pytest.raises(asyncpg.PostgresError) as refused:
        await sql_jobs(conn, jobs)
    assert refused.value.sqlstate == "AS422" and reason in str(refused.value)
    assert await conn.fetchval("SELECT count(*) FROM aiservice.all_jobs") == 0


async def test_blocked_jobs_are_never_claimed_by_concurrent_claimers(conn: Conn, database_url: str) -> None:
    first, *rest = await sql_jobs(
        conn, [{"owner_ref": "a"}, *({"owner_ref": f"b{i}", "depends_on": ["$0"]} for i in range(20))]
    )
    blocked = {r["id"] for r in rest}
    claimed: list[int] = []

    async def claimer(n: int) -> None:
        c = await asyncpg.connect(database_url)
        try:
            for _ in range(20):
                claimed.extend(r["id"] for r in await c.fetch("SELECT id FROM aiservice.claim_jobs($1, 5)", f"w{n}"))
                await asyncio.sleep(0.01)
        finally:
            await c.close()

    await asyncio.gather(*(claimer(n) for n in range(8)))
    assert claimed == [first["id"]]
    assert not blocked & set(claimed)


async def test_completing_a_job_with_a_thousand_dependents_reads_a_handful_of_rows(conn: Conn) -> None:
    root = await create(conn)
    await sql_jobs(conn, [{"owner_ref": f"d{i}", "depends_on": [root["id"]]} for i in range(1000)])
    (got,) = await claim(conn, limit=1)
    assert got["id"] == root["id"]
    await conn.execute("ANALYZE aiservice.jobs")
    await conn.execute("ANALYZE aiservice.job_dependencies")
    before = await rows_read(conn, "aiservice.jobs") + await rows_read(conn, "aiservice.job_dependencies")
    await complete(conn, root["id"], {"ok": True})
    after = await rows_read(conn, "aiservice.jobs") + await rows_read(conn, "aiservice.job_dependencies")
    assert after - before < 20, after - before
    # The dependents are resolved later, in a claim or maintain(), in steps.
    assert await conn.fetchval("SELECT count(*) FROM aiservice.all_jobs WHERE blocked") == 1000
    await conn.execute("SELECT aiservice.maintain()")
    assert await conn.fetchval("SELECT count(*) FROM aiservice.all_jobs WHERE blocked") == 0


MIB = 1024 * 1024


async def finished_with(conn: Conn, results: list[dict[str, Any]]) -> list[int]:
    """Jobs of task type "dep", completed with these results."""
    ids = [(await create(conn, owner_ref=f"dep/{i}", task_type="dep"))["id"] for i in range(len(results))]
    claimed = await conn.fetch("SELECT id FROM aiservice.claim_jobs('w1', $1, p_task_types => '{dep}')", len(ids))
    assert sorted(r["id"] for r in claimed) == ids
    for job_id, result in zip(ids, results, strict=True):
        await complete(conn, job_id, result)
    return ids


def result_bytes(dependencies: list[dict[str, Any]]) -> int:
    return sum(len(json.dumps(d["result"])) for d in dependencies if d["result"] is not None)


async def test_a_claim_carries_at_most_its_bound_of_dependency_results(conn: Conn, store: JobStore) -> None:
    ids = await finished_with(conn, [{"text": str(i) * MIB} for i in range(10)])  # 10 MiB of results
    dependent = await create(conn, depends_on=ids)
    await conn.execute("SELECT aiservice.maintain()")  # resolves: claimable

    (row,) = await conn.fetch("SELECT (r.job).id, r.dependencies FROM aiservice.claim_jobs_v2('w2', 10) r")
    deps = row["dependencies"]
    assert row["id"] == dependent["id"]
    assert [d["id"] for d in deps] == ids  # every dependency, in its place
    # The default bound, 8 MiB: seven 1 MiB results fit, the eighth would pass it.
    assert result_bytes(deps) <= 8 * MIB
    assert [d.get("result_omitted", False) for d in deps] == [False] * 7 + [True] * 3
    assert all(d["result"] is None and d["status"] == "completed" for d in deps[7:])

    # Through the store (as the worker and POST /jobs/claim call it) with a smaller bound.
    await conn.execute("SELECT FROM aiservice.release_job($1, 'w2')", dependent["id"])
    (claimed,) = await store.claim_jobs("w3", 10, lease_timeout=LEASE, max_dependency_bytes=2 * MIB + 100)
    assert claimed.dependencies is not None
    assert [d.result_omitted for d in claimed.dependencies] == [False] * 2 + [True] * 8
    assert result_bytes([d.model_dump() for d in claimed.dependencies]) <= 2 * MIB + 100


async def test_a_deleted_dependency_keeps_its_position_in_the_claim(conn: Conn) -> None:
    a, b = await finished_with(conn, [{"text": "notes of job A"}, {"text": "SECRET notes of job B"}])
    dependent = await create(conn, depends_on=[a, b])
    await conn.execute("SELECT aiservice.maintain()")
    await conn.execute("DELETE FROM aiservice.job_history WHERE id = $1", a)  # by hand, or by an older retention
    (row,) = await conn.fetch("SELECT (r.job).id, r.dependencies FROM aiservice.claim_jobs_v2('w2', 10) r")
    assert row["id"] == dependent["id"]
    first, second = row["dependencies"]
    assert first == {"id": a, "task_type": None, "model_profile": None, "status": None, "result": None, "deleted": True}
    assert (second["id"], second["result"]) == (b, {"text": "SECRET notes of job B"})
