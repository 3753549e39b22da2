"""Finishing a job (schema/functions/finish.sql): complete_job, complete_jobs, fail_job with its backoff,
release_job, and the move of a finished job from aiservice.jobs to aiservice.job_history."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from conftest import JobFactory
from sqlapi import LEASE, RETRYABLE, Conn, call, claim, claim_tokens, create, get, one, refused, running

from aiservice import errors
from aiservice.db.store import JobStore
from aiservice.jobs import Job, JobStatus


async def test_complete_job(conn: Conn) -> None:
    job = await running(conn)
    done = await one(conn, "complete_job", id=job["id"], worker_id="w1", result={"content": "hi", "usage": {"t": 3}})
    assert done["status"] == "completed"
    assert done["result"] == {"content": "hi", "usage": {"t": 3}}
    assert done["finished_at"] == done["updated_at"]
    assert done["lease_token"] is done["lease_expires_at"] is None
    assert done["worker_id"] == "w1"  # who ran it stays
    assert done["attempts"] == 1
    assert dict(await get(conn, job["id"])) == dict(done)


async def test_complete_job_with_the_lease_token_and_clears_an_earlier_error(conn: Conn) -> None:
    job = await running(conn)
    await call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="timeout", retry_after=timedelta(0))
    (again,) = await claim(conn, "w2")
    done = await one(
        conn, "complete_job", id=job["id"], worker_id="w2", result={"ok": 1}, lease_token=again["lease_token"]
    )
    assert (done["status"], done["error_category"], done["error_message"]) == ("completed", None, None)
    assert done["attempts"] == 2


async def test_complete_job_refusals(conn: Conn) -> None:
    job = await running(conn)
    for result in [None, [1], "done", 3]:
        await refused("AS422", call(conn, "complete_job", id=job["id"], worker_id="w1", result=result))
    assert (await get(conn, job["id"]))["status"] == "running"
    await refused("AS404", call(conn, "complete_job", id=424242, worker_id="w1", result={}))
    pending = await create(conn)
    await refused("AS410", call(conn, "complete_job", id=pending["id"], worker_id="w1", result={}))
    job = await running(conn)
    await refused("AS410", call(conn, "complete_job", id=job["id"], worker_id="w2", result={}))
    await call(conn, "complete_job", id=job["id"], worker_id="w1", result={"n": 1})
    await refused("AS410", call(conn, "complete_job", id=job["id"], worker_id="w1", result={"n": 2}))
    assert (await get(conn, job["id"]))["result"] == {"n": 1}


def delay(job: asyncpg.Record) -> float:
    """Seconds between the failure (updated_at) and the next run (run_at): both set from now()."""
    seconds: float = (job["run_at"] - job["updated_at"]).total_seconds()
    return seconds


async def test_fail_non_retryable_category_fails_the_job(conn: Conn) -> None:
    job = await running(conn)
    failed = await one(
        conn, "fail_job", id=job["id"], worker_id="w1", error_category="bad_input", error_message="no messages"
    )
    assert failed["status"] == "failed"
    assert (failed["error_category"], failed["error_message"]) == ("bad_input", "no messages")
    assert failed["finished_at"] == failed["updated_at"]
    assert failed["worker_id"] == "w1"
    assert failed["lease_token"] is failed["lease_expires_at"] is None
    assert failed["run_at"] == job["run_at"]
    assert await claim(conn) == []


async def test_fail_retryable_categories_back_off(conn: Conn) -> None:
    for category in RETRYABLE:
        job = await running(conn)
        retry = await one(conn, "fail_job", id=job["id"], worker_id="w1", error_category=category, error_message="slow")
        assert retry["status"] == "pending"
        assert (retry["error_category"], retry["error_message"]) == (category, "slow")
        assert retry["attempts"] == 1
        assert retry["worker_id"] is retry["lease_token"] is retry["lease_expires_at"] is retry["finished_at"] is None
        assert 7.5 <= delay(retry) <= 12.5, category  # 10 s ± 25 %
    assert await claim(conn) == []  # none is due yet


async def test_fail_backoff_doubles_per_attempt_up_to_an_hour(conn: Conn) -> None:
    for attempts, base in [(2, 20), (3, 40), (5, 160), (9, 2560), (10, 3600), (30, 3600)]:
        job = await running(conn, max_attempts=100)
        await conn.execute("UPDATE aiservice.jobs SET attempts = $2 WHERE id = $1", job["id"], attempts)
        retry = await one(conn, "fail_job", id=job["id"], worker_id="w1", error_category="timeout")
        assert retry["status"] == "pending"
        assert base * 0.75 <= delay(retry) <= base * 1.25, attempts


async def test_fail_backoff_at_high_attempt_counts(conn: Conn) -> None:
    # max_attempts goes up to 100; the delay must stay capped instead of overflowing an interval.
    job = await running(conn, max_attempts=100)
    await conn.execute("UPDATE aiservice.jobs SET attempts = 99 WHERE id = $1", job["id"])
    retry = await one(conn, "fail_job", id=job["id"], worker_id="w1", error_category="rate_limited")
    assert retry["status"] == "pending"
    assert 2700 <= delay(retry) <= 4500


async def test_fail_retry_after_overrides_the_backoff(conn: Conn) -> None:
    job = await running(conn)
    retry = await one(
        conn, "fail_job", id=job["id"], worker_id="w1", error_category="rate_limited", retry_after=timedelta(seconds=90)
    )
    assert retry["status"] == "pending"
    assert delay(retry) == 90
    job = await running(conn, model_profile="other")  # rate_limited cooled the first profile down
    now = await one(conn, "fail_job", id=job["id"], worker_id="w1", error_category="timeout", retry_after=timedelta(0))
    assert delay(now) == 0
    assert [r["id"] for r in await claim(conn)] == [job["id"]]


async def test_fail_with_attempts_exhausted_fails_the_job(conn: Conn) -> None:
    job = await running(conn, max_attempts=2)
    retry = await one(
        conn, "fail_job", id=job["id"], worker_id="w1", error_category="timeout", retry_after=timedelta(0)
    )
    assert retry["status"] == "pending"
    (second,) = await claim(conn, "w2")
    assert second["attempts"] == 2
    failed = await one(
        conn, "fail_job", id=job["id"], worker_id="w2", error_category="timeout", retry_after=timedelta(0)
    )
    assert failed["status"] == "failed"
    assert failed["error_category"] == "timeout"
    assert failed["finished_at"] is not None
    assert failed["worker_id"] == "w2"


async def test_fail_retryable_overrides_the_category_default(conn: Conn) -> None:
    job = await running(conn)
    retry = await one(conn, "fail_job", id=job["id"], worker_id="w1", error_category="bad_output", retryable=True)
    assert retry["status"] == "pending"
    assert 7.5 <= delay(retry) <= 12.5
    job = await running(conn)
    failed = await one(conn, "fail_job", id=job["id"], worker_id="w1", error_category="timeout", retryable=False)
    assert failed["status"] == "failed"
    job = await running(conn, max_attempts=1)
    failed = await one(conn, "fail_job", id=job["id"], worker_id="w1", error_category="x", retryable=True)
    assert failed["status"] == "failed"  # retryable cannot exceed max_attempts


async def test_fail_truncates_the_message_and_validates_its_arguments(conn: Conn) -> None:
    job = await running(conn)
    failed = await one(conn, "fail_job", id=job["id"], worker_id="w1", error_category="boom", error_message="é" * 5000)
    assert failed["error_message"] == "é" * 4000
    job = await running(conn)
    for args in [
        {"error_category": None},
        {"error_category": ""},
        {"error_category": "Timeout"},
        {"error_category": "1st"},
        {"error_category": "with space"},
        {"error_category": "a" * 65},
        {"error_category": "timeout", "retry_after": timedelta(seconds=-1)},
        {"error_category": "timeout", "retry_after": timedelta(days=7, seconds=1)},
    ]:
        await refused("AS422", call(conn, "fail_job", id=job["id"], worker_id="w1", **args))
    assert (await get(conn, job["id"]))["status"] == "running"


async def test_fail_refusals(conn: Conn) -> None:
    await refused("AS404", call(conn, "fail_job", id=777, worker_id="w1", error_category="timeout"))
    job = await running(conn)
    await refused("AS410", call(conn, "fail_job", id=job["id"], worker_id="w2", error_category="timeout"))
    await refused(
        "AS410",
        call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="timeout", lease_token=uuid.uuid4()),
    )
    await call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="bad_input")
    await refused("AS410", call(conn, "fail_job", id=job["id"], worker_id="w1", error_category="bad_input"))


async def test_release_job_returns_it_without_using_an_attempt(conn: Conn) -> None:
    job = await running(conn, max_attempts=1)
    for _ in range(3):
        released = await one(conn, "release_job", id=job["id"], worker_id="w1", lease_token=job["lease_token"])
        assert released["status"] == "pending"
        assert released["attempts"] == 0
        assert released["error_category"] == "worker_shutdown"
        assert released["worker_id"] is released["started_at"] is released["lease_token"] is None
        assert released["run_at"] == released["updated_at"]
        (job,) = await claim(conn)
        assert job["attempts"] == 1
    done = await one(conn, "complete_job", id=job["id"], worker_id="w1", result={})
    assert done["status"] == "completed"


async def test_release_job_refusals(conn: Conn) -> None:
    await refused("AS404", call(conn, "release_job", id=55, worker_id="w1"))
    job = await running(conn)
    await refused("AS410", call(conn, "release_job", id=job["id"], worker_id="w2"))
    await refused("AS410", call(conn, "release_job", id=job["id"], worker_id="w1", lease_token=uuid.uuid4()))
    await call(conn, "release_job", id=job["id"], worker_id="w1")
    await refused("AS410", call(conn, "release_job", id=job["id"], worker_id="w1"))


# --- aiservice.complete_jobs (0003): many completions in one call, fenced per job like complete_job.


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


# --- Live jobs apart from history: a finished job leaves aiservice.jobs for aiservice.job_history (partitioned by
# day), a retry brings it back, retention drops whole day partitions, and every read answers as if there were one
# table.


JOB = {"owner_service": "telephony", "task_type": "llm_chat", "model_profile": "qwen"}


async def new_jobs(conn: Conn, n: int, **fields: Any) -> list[int]:
    rows = await conn.fetch(
        "SELECT (j.job).id FROM aiservice.create_jobs($1, $2) j",
        [{"owner_ref": f"call/{i}"} | fields for i in range(n)],
        JOB,
    )
    return [r["id"] for r in rows]


async def where(conn: Conn, job_id: int) -> str:
    """The table a job's row is in: 'jobs', 'job_history', or '' (none)."""
    live = await conn.fetchval("SELECT count(*) FROM aiservice.jobs WHERE id = $1", job_id)
    done = await conn.fetchval("SELECT count(*) FROM aiservice.job_history WHERE id = $1", job_id)
    assert live + done <= 1, f"job {job_id} is in both tables"
    return "jobs" if live else "job_history" if done else ""


async def complete(conn: Conn, claimed: list[asyncpg.Record]) -> list[str]:
    rows = await conn.fetch(
        "SELECT outcome FROM aiservice.complete_jobs('w', $1, $2, $3)",
        [r["id"] for r in claimed],
        [{"text": f"result {r['id']}", "usage": {"total_tokens": 7}} for r in claimed],
        [r["lease_token"] for r in claimed],
    )
    return [r["outcome"] for r in rows]


async def test_every_way_of_finishing_moves_the_job_and_a_retry_brings_it_back(conn: Conn) -> None:
    done, failed, cancelled, expired, waiting = await new_jobs(conn, 5, max_attempts=1)
    claimed = {r["id"]: r for r in await claim_tokens(conn)}
    assert set(claimed) == {done, failed, cancelled, expired, waiting}
    await conn.execute("SELECT 1 FROM aiservice.release_job($1, 'w')", waiting)
    assert await complete(conn, [claimed[done]]) == ["completed"]
    await conn.execute(
        "SELECT 1 FROM aiservice.fail_job($1, 'w', 'invalid_input', 'bad', p_retryable => false)", failed
    )
    await conn.execute("SELECT 1 FROM aiservice.cancel_job($1)", cancelled)
    await conn.execute(
        "UPDATE aiservice.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1", expired
    )
    assert await conn.fetchval("SELECT count(*) FROM aiservice.expire_leases()") == 1

    assert [await where(conn, i) for i in (done, failed, cancelled, expired)] == ["job_history"] * 4
    assert await where(conn, waiting) == "jobs"
    statuses = {r["id"]: (r["status"], r["error_category"]) for r in await conn.fetch(
        "SELECT id, status::text, error_category FROM aiservice.all_jobs")}  # fmt: skip
    assert statuses == {
        done: ("completed", None),
        failed: ("failed", "invalid_input"),
        cancelled: ("cancelled", None),
        expired: ("failed", "lease_expired"),
        waiting: ("pending", "worker_shutdown"),
    }
    got = await conn.fetchrow("SELECT * FROM aiservice.get_job($1)", done)
    assert got["result"] == {"text": f"result {done}", "usage": {"total_tokens": 7}}
    assert got["finished_at"] is not None and got["lease_token"] is None

    assert await conn.fetchval("SELECT count(*) FROM aiservice.retry_jobs(p_ids => $1)", [failed, expired]) == 2
    assert [await where(conn, i) for i in (failed, expired)] == ["jobs", "jobs"]
    back = await conn.fetchrow("SELECT * FROM aiservice.get_job($1)", failed)
    assert (back["status"], back["attempts"], back["finished_at"], back["error_category"]) == ("pending", 0, None, None)


async def test_the_live_table_refuses_a_finished_row(conn: Conn) -> None:
    (job_id,) = await new_jobs(conn, 1)
    with pytest.raises(asyncpg.CheckViolationError, match="jobs_live_check"):
        await conn.execute("UPDATE aiservice.jobs SET status = 'cancelled', finished_at = now() WHERE id = $1", job_id)


async def test_a_finished_job_answers_as_finished_to_its_worker_and_to_cancel(conn: Conn) -> None:
    (job_id,) = await new_jobs(conn, 1)
    (claimed,) = await claim_tokens(conn)
    assert await complete(conn, [claimed]) == ["completed"]
    assert await complete(conn, [claimed]) == ["lease_lost"]  # not "not_found": it exists, finished
    with pytest.raises(asyncpg.PostgresError) as lost:
        await conn.execute("SELECT 1 FROM aiservice.heartbeat_job($1, 'w')", job_id)
    assert lost.value.sqlstate == "AS410"
    with pytest.raises(asyncpg.PostgresError) as refused:
        await conn.execute("SELECT 1 FROM aiservice.cancel_job($1)", job_id)
    assert refused.value.sqlstate == "AS409"
    with pytest.raises(asyncpg.PostgresError) as missing:
        await conn.execute("SELECT 1 FROM aiservice.cancel_job($1)", job_id + 1000)
    assert missing.value.sqlstate == "AS404"
