"""aiservice.complete_jobs (0003): many completions in one call, fenced per job like complete_job."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any, TypeAlias

import asyncpg
import pytest
from conftest import JobFactory

from aiservice import errors
from aiservice.db.store import JobStore
from aiservice.jobs import Job, JobStatus

Conn: TypeAlias = "asyncpg.Connection[Any]"
LEASE = timedelta(minutes=15)


async def claimed(store: JobStore, job_factory: JobFactory, n: int, worker: str = "w1") -> list[Job]:
    for _ in range(n):
        await job_factory()
    jobs = await store.claim_jobs(worker, n, lease_timeout=LEASE)
    assert len(jobs) == n
    return jobs


async def complete_jobs(conn: Conn, worker: str, ids: list[int], results: list[Any], tokens: Any = None) -> list[Any]:
    return await conn.fetch(
        "SELECT id, outcome FROM aiservice.complete_jobs($1, $2, $3, $4)", worker, ids, results, tokens
    )


async def test_completes_every_job_with_its_own_result(store: JobStore, job_factory: JobFactory) -> None:
    jobs = await claimed(store, job_factory, 3)
    outcomes = await store.complete_jobs("w1", [(j.id, j.lease_token, {"n": i}) for i, j in enumerate(jobs)])
    assert outcomes == {j.id: "completed" for j in jobs}
    for i, j in enumerate(jobs):
        done = await store.get_job(j.id)
        assert done.status == JobStatus.COMPLETED
        assert done.result == {"n": i}
        assert done.lease_token is None and done.lease_expires_at is None
        assert done.finished_at is not None and done.worker_id == "w1"
        assert done.error_category is None and done.error_message is None


async def test_outcomes_come_back_in_input_order(conn: Conn, store: JobStore, job_factory: JobFactory) -> None:
    jobs = await claimed(store, job_factory, 3)
    ids = [jobs[2].id, 10**12, jobs[0].id, jobs[1].id]
    rows = await complete_jobs(conn, "w1", ids, [{}, {}, {}, {}])
    assert [(r["id"], r["outcome"]) for r in rows] == [
        (jobs[2].id, "completed"),
        (10**12, "not_found"),
        (jobs[0].id, "completed"),
        (jobs[1].id, "completed"),
    ]


async def test_fencing_is_per_job(store: JobStore, job_factory: JobFactory) -> None:
    mine = await claimed(store, job_factory, 2, "w1")
    theirs = await claimed(store, job_factory, 1, "w2")
    cancelled = mine[1]
    await store.cancel_job(cancelled.id)
    outcomes = await store.complete_jobs(
        "w1",
        [
            (mine[0].id, uuid.uuid4(), {"stale": True}),  # a token from an older claim
            (cancelled.id, cancelled.lease_token, {}),
            (theirs[0].id, theirs[0].lease_token, {}),
        ],
    )
    assert outcomes == {mine[0].id: "lease_lost", cancelled.id: "lease_lost", theirs[0].id: "lease_lost"}
    assert (await store.get_job(mine[0].id)).status == JobStatus.RUNNING
    assert (await store.get_job(cancelled.id)).status == JobStatus.CANCELLED
    assert (await store.get_job(theirs[0].id)).status == JobStatus.RUNNING
    # The lost ones do not stop the others in the same call.
    outcomes = await store.complete_jobs("w1", [(mine[0].id, mine[0].lease_token, {}), (cancelled.id, None, {})])
    assert outcomes == {mine[0].id: "completed", cancelled.id: "lease_lost"}


async def test_a_null_token_skips_only_the_token_check(conn: Conn, store: JobStore, job_factory: JobFactory) -> None:
    (job,) = await claimed(store, job_factory, 1)
    assert [r["outcome"] for r in await complete_jobs(conn, "w2", [job.id], [{}])] == ["lease_lost"]
    assert [r["outcome"] for r in await complete_jobs(conn, "w1", [job.id], [{}])] == ["completed"]
    # Completed already: a repeat is refused, the first result stays.
    assert [r["outcome"] for r in await complete_jobs(conn, "w1", [job.id], [{"again": 1}])] == ["lease_lost"]
    assert (await store.get_job(job.id)).result == {}


@pytest.mark.parametrize(
    ("ids", "results", "tokens"),
    [
        ([1, 2], [{}], None),
        ([1], [{}], [None, None]),
        ([1, 1], [{}, {}], None),
        ([1, None], [{}, {}], None),
        ([1], [5], None),  # a JSON number, not an object
        ([1], [None], None),
        (list(range(1, 1002)), [{}] * 1001, None),
    ],
)
async def test_bad_arguments_raise_as422_and_change_nothing(
    conn: Conn, store: JobStore, job_factory: JobFactory, ids: list[Any], results: list[Any], tokens: Any
) -> None:
    (job,) = await claimed(store, job_factory, 1)
    ids = [job.id if i == 1 else i for i in ids]
    with pytest.raises(asyncpg.PostgresError) as caught:
        await complete_jobs(conn, "w1", ids, results, tokens)
    assert caught.value.sqlstate == "AS422"
    assert (await store.get_job(job.id)).status == JobStatus.RUNNING


async def test_store_maps_bad_arguments_to_invalid_argument(store: JobStore, job_factory: JobFactory) -> None:
    (job,) = await claimed(store, job_factory, 1)
    with pytest.raises(errors.InvalidArgument):
        await store.complete_jobs("w1", [(job.id, job.lease_token, {}), (job.id, job.lease_token, {})])


async def test_empty_call_is_a_no_op(store: JobStore) -> None:
    assert await store.complete_jobs("w1", []) == {}


async def test_one_notification_per_call_and_counts_follow(
    database_url: str, store: JobStore, job_factory: JobFactory
) -> None:
    jobs = await claimed(store, job_factory, 4)
    listener = await asyncpg.connect(database_url)
    got: list[str] = []
    try:
        await listener.add_listener("aiservice_jobs", lambda *a: got.append(str(a[3])))
        await store.complete_jobs("w1", [(j.id, j.lease_token, {}) for j in jobs])
        await asyncio.sleep(0.2)
    finally:
        await listener.close()
    # Completion wakes nobody and aborts nobody (as with complete_job).
    assert got == []
    await store.compact_counts()
    stats = await store.stats()
    counts = {(s.status, s.task_type): s.count for s in stats.by_status}
    assert counts[(JobStatus.COMPLETED, "llm_chat")] == 4
    assert (JobStatus.RUNNING, "llm_chat") not in counts


async def test_concurrent_batches_over_the_same_jobs_complete_each_once(
    database_url: str, store: JobStore, job_factory: JobFactory
) -> None:
    jobs = await claimed(store, job_factory, 20)
    forward = [(j.id, j.lease_token, {"by": "a"}) for j in jobs]
    backward = [(j.id, j.lease_token, {"by": "b"}) for j in reversed(jobs)]
    a, b = await asyncio.gather(store.complete_jobs("w1", forward), store.complete_jobs("w1", backward))
    for j in jobs:
        assert sorted([a[j.id], b[j.id]]) == ["completed", "lease_lost"]
        winner = "a" if a[j.id] == "completed" else "b"
        assert (await store.get_job(j.id)).result == {"by": winner}
