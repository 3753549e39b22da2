"""aiservice.create_job and create_jobs (schema/functions/create.sql): defaults, every field, bad arguments,
idempotency keys (a repeat must be the same request) and concurrent creates with one key."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import asyncpg
import pytest
from sqlapi import (
    CREATE_JOBS,
    JOB,
    Conn,
    Connections,
    call,
    claim,
    claim_tokens,
    count,
    create,
    create_jobs,
    get,
    refused,
    select,
    together,
)


async def test_create_job_with_defaults(conn: Conn) -> None:
    job = await create(conn)
    assert job["created"] is True
    assert job["status"] == "pending"
    assert (job["attempts"], job["max_attempts"], job["priority"]) == (0, 3, 0)
    assert job["input"] == {}
    assert job["result"] is None
    assert job["run_at"] == job["created_at"] == job["updated_at"]
    for column in ("worker_id", "lease_token", "lease_expires_at", "started_at", "finished_at"):
        assert job[column] is None, column
    assert job["error_category"] is job["idempotency_key"] is None
    assert dict(await get(conn, job["id"])) == {k: v for k, v in job.items() if k != "created"}


async def test_create_job_with_every_field(conn: Conn) -> None:
    later = datetime(2099, 1, 2, 3, 4, 5, tzinfo=UTC)
    job = await create(
        conn,
        owner_ref="beeline/42",
        input={"user": "hi", "nested": [1, {"a": None}]},
        priority=-7,
        run_at=later,
        max_attempts=9,
        idempotency_key="call-42",
    )
    assert job["owner_ref"] == "beeline/42"
    assert job["input"] == {"user": "hi", "nested": [1, {"a": None}]}
    assert (job["priority"], job["run_at"], job["max_attempts"]) == (-7, later, 9)
    assert job["idempotency_key"] == "call-42"
    # NULL optional arguments take the defaults
    nulls = await create(conn, priority=None, run_at=None, max_attempts=None)
    assert (nulls["priority"], nulls["max_attempts"]) == (0, 3)
    assert nulls["run_at"] == nulls["created_at"]


async def test_create_job_idempotency_key_is_unique_per_owner_service(conn: Conn) -> None:
    first = await create(conn, idempotency_key="k1", input={"n": 1})
    again = await create(conn, idempotency_key="k1", input={"n": 1})
    assert first["created"] is True
    assert again["created"] is False
    assert dict(again) == dict(first) | {"created": False}
    assert await count(conn) == 1
    other = await create(conn, owner_service="monitoring-tg", idempotency_key="k1")
    assert other["created"] is True
    assert other["id"] != first["id"]
    assert await count(conn) == 2
    # without a key every call creates
    a = await create(conn)
    b = await create(conn)
    assert a["created"] and b["created"]
    assert first["id"] < a["id"] < b["id"]


async def test_create_job_idempotency_key_returns_the_job_in_its_current_state(conn: Conn) -> None:
    first = await create(conn, idempotency_key="k1", priority=1000)
    await claim(conn)
    await call(conn, "complete_job", id=first["id"], worker_id="w1", result={"ok": True})
    again = await create(conn, idempotency_key="k1", priority=1000)
    assert (again["id"], again["created"], again["status"]) == (first["id"], False, "completed")
    assert again["result"] == {"ok": True}


async def test_create_job_refuses_bad_arguments(conn: Conn) -> None:
    for value in [None, [], [1], "text", 5]:
        await refused("AS422", create(conn, input=value))  # input must be a JSON object
    for args in [
        {"owner_service": ""},
        {"owner_ref": "x" * 501},
        {"task_type": ""},
        {"model_profile": "m" * 201},
        {"priority": 1001},
        {"max_attempts": 0},
        {"max_attempts": 101},
        {"idempotency_key": ""},
    ]:
        await refused("23514", create(conn, **args))
    assert await count(conn) == 0
    await refused("23502", create(conn, task_type=None))


async def test_create_jobs_merges_defaults_and_keeps_input_order(conn: Conn) -> None:
    later = datetime(2099, 5, 6, tzinfo=UTC)
    defaults = JOB | {"input": {"from": "defaults"}, "priority": 3, "max_attempts": 5}
    jobs = [
        {"owner_ref": "c"},
        {"owner_ref": "a", "input": {"own": True}, "priority": -1},
        {"owner_ref": "e", "task_type": "transcribe", "model_profile": "whisperx", "run_at": later.isoformat()},
        {"owner_ref": "b", "max_attempts": 1, "idempotency_key": "kb"},
        {"owner_ref": "d", "owner_service": "monitoring-pf"},
    ]
    rows = await create_jobs(conn, jobs, defaults)
    assert [r["owner_ref"] for r in rows] == ["c", "a", "e", "b", "d"]
    assert all(r["created"] for r in rows)
    assert len({r["id"] for r in rows}) == 5
    c, a, e, b, d = rows
    assert (c["input"], c["priority"], c["max_attempts"], c["task_type"]) == ({"from": "defaults"}, 3, 5, "llm_chat")
    assert (a["input"], a["priority"]) == ({"own": True}, -1)
    assert (e["task_type"], e["model_profile"], e["run_at"]) == ("transcribe", "whisperx", later)
    assert (b["max_attempts"], b["idempotency_key"]) == (1, "kb")
    assert (d["owner_service"], d["owner_ref"]) == ("monitoring-pf", "d")
    assert c["run_at"] == c["created_at"]
    assert all(r["status"] == "pending" and r["attempts"] == 0 for r in rows)
    stored = {r["id"]: dict(r) for r in await call(conn, "list_jobs", limit=None)}
    assert stored == {r["id"]: {k: v for k, v in r.items() if k != "created"} for r in rows}


async def test_create_jobs_without_defaults_and_without_jobs(conn: Conn) -> None:
    (row,) = await create_jobs(conn, [JOB])
    assert (row["input"], row["priority"], row["max_attempts"]) == ({}, 0, 3)
    assert row["run_at"] == row["created_at"]
    assert await create_jobs(conn, [], JOB) == []
    assert await count(conn) == 1


async def test_create_jobs_repeated_key_inside_one_batch_creates_one_job(conn: Conn) -> None:
    rows = await create_jobs(
        conn,
        [
            {"owner_ref": "1", "idempotency_key": "k1"},
            {"owner_ref": "2", "idempotency_key": "k2"},
            {"owner_ref": "1", "idempotency_key": "k1"},  # the same job again
            {"owner_ref": "4"},
            {"owner_ref": "5", "idempotency_key": "k1", "owner_service": "other"},
        ],
        JOB,
    )
    assert [r["created"] for r in rows] == [True, True, False, True, True]
    assert rows[2]["id"] == rows[0]["id"]
    assert rows[2]["owner_ref"] == "1"
    assert rows[4]["id"] != rows[0]["id"]
    assert await count(conn) == 4


async def test_create_jobs_repeated_batch_creates_nothing_and_returns_the_same_jobs(conn: Conn) -> None:
    jobs = [{"owner_ref": str(i), "idempotency_key": f"k{i}"} for i in range(5)]
    first = await create_jobs(conn, jobs, JOB)
    again = await create_jobs(conn, [*reversed(jobs), {"owner_ref": "new", "idempotency_key": "k9"}], JOB)
    assert [r["created"] for r in again] == [False] * 5 + [True]
    assert [r["id"] for r in again[:5]] == [r["id"] for r in reversed(first)]
    assert await count(conn) == 6


async def test_create_jobs_sees_keys_of_single_creates(conn: Conn) -> None:
    single = await create(conn, idempotency_key="k1")
    (row,) = await create_jobs(conn, [{"idempotency_key": "k1"}], JOB)
    assert (row["id"], row["created"]) == (single["id"], False)
    again = await create(conn, idempotency_key="k2")
    (row,) = await create_jobs(conn, [{"idempotency_key": "k2"}], JOB)
    assert (row["id"], row["created"]) == (again["id"], False)


async def test_create_jobs_refuses_bad_input(conn: Conn) -> None:
    for jobs, defaults in [
        ({"owner_ref": "x"}, {}),
        (None, {}),
        ("[]", {}),
        ([JOB, 1], {}),
        ([JOB, [JOB]], {}),
        ([JOB | {"input": [1, 2]}], {}),
        ([JOB | {"input": None}], {"input": "text"}),
        ([JOB], {"input": "text"}),
        ([JOB], []),
        ([JOB], None),
    ]:
        args = {"jobs": jobs, "defaults": defaults}
        await refused("AS422", select(conn, "create_jobs", args, "(r.job).*, r.created"))
    assert await count(conn) == 0


async def test_create_jobs_takes_a_default_for_a_field_given_as_null(conn: Conn) -> None:
    """null means "not given", as in the HTTP batch: the default applies, then create_job's own."""
    defaults = JOB | {"priority": 7, "input": {"lang": "ru"}, "max_attempts": 5}
    (row,) = await create_jobs(
        conn, [{"owner_ref": "n", "priority": None, "input": None, "max_attempts": None}], defaults
    )
    assert (row["priority"], row["input"], row["max_attempts"]) == (7, {"lang": "ru"}, 5)
    (row,) = await create_jobs(conn, [JOB | {"owner_ref": "m", "priority": None, "input": None}], {})
    assert (row["priority"], row["input"]) == (0, {})


async def test_create_jobs_is_all_or_nothing(conn: Conn) -> None:
    await refused("23514", create_jobs(conn, [{"owner_ref": "ok"}, {"owner_ref": "bad", "priority": 5000}], JOB))
    await refused("23502", create_jobs(conn, [JOB, {"owner_ref": "no task type"}]))
    assert await count(conn) == 0


# --- Idempotency keys: a repeat must be the same request, or it is refused and nothing is created.


KEYED_JOB = {
    "owner_service": "telephony",
    "owner_ref": "beeline/7",
    "task_type": "llm_chat",
    "model_profile": "qwen2.5-14b",
}


# The README's HTTP walk-through creates this job, then cancels it.
WALKTHROUGH_ANALYSIS = {
    "owner_service": "telephony",
    "owner_ref": "beeline/42",
    "task_type": "call_analysis",
    "model_profile": "qwen2.5-14b",
    "input": {"system": "Answer as JSON.", "user": "Classify this call", "max_tokens": 256},
    "idempotency_key": "beeline/42/analysis",
}


def telephony_pipeline(call_id: str = "42") -> dict[str, Any]:
    """The README's telephony example (tests/example_telephony.py) as a batch body."""
    return {
        "defaults": {"owner_service": "telephony", "owner_ref": f"beeline/{call_id}"},
        "jobs": [
            {
                "task_type": "transcribe",
                "model_profile": "whisperx",
                "input": {"audio_url": f"https://records.example/beeline/{call_id}.wav", "language": "ru"},
                "idempotency_key": f"beeline/{call_id}/transcribe",
            },
            {
                "task_type": "call_analysis",
                "model_profile": "qwen2.5-14b",
                "depends_on": ["$0"],
                "input": {"user": "Classify this call. Transcript: {{dependencies.0.result.text}}"},
                "idempotency_key": f"beeline/{call_id}/analysis",
            },
        ],
    }


async def create_keyed(conn: Conn, **args: Any) -> asyncpg.Record:
    names = list(KEYED_JOB | args)
    params = ", ".join(f"p_{name} => ${i}" for i, name in enumerate(names, 1))
    row = await conn.fetchrow(
        f"SELECT (r.job).*, r.created FROM aiservice.create_job({params}) r", *(KEYED_JOB | args).values()
    )
    assert row is not None
    return row


async def create_jobs_keyed(
    conn: Conn, jobs: list[dict[str, Any]], defaults: dict[str, Any] | None = None
) -> list[Any]:
    return await conn.fetch("SELECT (r.job).*, r.created FROM aiservice.create_jobs($1, $2) r", jobs, defaults or {})


async def idempotency_conflict(conn: Conn, call: Any) -> asyncpg.PostgresError:
    with pytest.raises(asyncpg.PostgresError) as caught:
        await call
    assert caught.value.sqlstate == "AS412", caught.value
    return caught.value


async def counts(conn: Conn) -> tuple[int, int, int]:
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM aiservice.all_jobs) AS jobs, (SELECT count(*) FROM aiservice.batches) AS batches,"
        " (SELECT count(*) FROM aiservice.job_dependencies) AS deps"
    )
    assert row is not None
    return row["jobs"], row["batches"], row["deps"]


async def test_the_same_request_answers_the_existing_job(conn: Conn) -> None:
    first = await create_keyed(conn, input={"n": 1}, priority=5, max_attempts=2, idempotency_key="k")
    again = await create_keyed(conn, input={"n": 1}, priority=5, max_attempts=2, idempotency_key="k")
    assert (first["created"], again["created"], again["id"]) == (True, False, first["id"])
    assert (await counts(conn))[0] == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"owner_ref": "beeline/8"}, "owner_ref"),
        ({"task_type": "call_analysis"}, "task_type"),
        ({"model_profile": "other"}, "model_profile"),
        ({"input": {"n": 2}}, "input"),
        ({"input": {}}, "input"),
        ({"priority": 6}, "priority"),
        ({"max_attempts": 3}, "max_attempts"),
        ({"run_at": datetime(2031, 1, 1, tzinfo=UTC)}, "run_at"),
    ],
)
async def test_a_different_request_under_the_key_is_refused(conn: Conn, change: dict[str, Any], field: str) -> None:
    request = {"input": {"n": 1}, "priority": 5, "max_attempts": 2, "idempotency_key": "beeline/7/summary"}
    first = await create_keyed(conn, **request)
    error = await idempotency_conflict(conn, create_keyed(conn, **(request | change)))
    assert 'idempotency_key "beeline/7/summary" already names job' in str(error)
    assert str(first["id"]) in str(error) and field in str(error)
    detail = json.loads(error.detail or "")  # type: ignore[attr-defined]
    assert detail == {"idempotency_key": "beeline/7/summary", "job_id": first["id"], "fields": [field], "index": None}
    assert (await counts(conn))[0] == 1


async def test_a_field_left_out_is_its_default(conn: Conn) -> None:
    await create_keyed(conn, input={}, priority=0, max_attempts=3, idempotency_key="defaults")
    assert (await create_keyed(conn, idempotency_key="defaults"))["created"] is False
    await create_keyed(conn, priority=5, idempotency_key="priority")
    error = await idempotency_conflict(conn, create_keyed(conn, idempotency_key="priority"))
    assert "different priority" in str(error)


async def test_run_at_compares_as_requested_not_as_the_job_moved(conn: Conn) -> None:
    asked = datetime.now(UTC) - timedelta(minutes=5)  # due: claimable now
    job = await create_keyed(conn, run_at=asked, idempotency_key="scheduled")
    (claimed,) = await conn.fetch("SELECT id FROM aiservice.claim_jobs('w1')")
    backoff = "SELECT FROM aiservice.fail_job($1, 'w1', 'timeout', 'slow', p_retry_after => '1 hour')"
    await conn.execute(backoff, job["id"])
    moved = await conn.fetchval("SELECT run_at FROM aiservice.all_jobs WHERE id = $1", job["id"])
    assert claimed["id"] == job["id"] and moved > datetime.now(UTC)
    # The job's run_at moved with its backoff; the request is still the same.
    assert (await create_keyed(conn, run_at=asked, idempotency_key="scheduled"))["created"] is False
    # Left out where the first gave one, given where the first left it out: different requests.
    assert "different run_at" in str(await idempotency_conflict(conn, create_keyed(conn, idempotency_key="scheduled")))
    await create_keyed(conn, idempotency_key="asap")
    assert "different run_at" in str(
        await idempotency_conflict(conn, create_keyed(conn, run_at=asked, idempotency_key="asap"))
    )


async def test_dependencies_are_part_of_the_request(conn: Conn) -> None:
    a = await create_keyed(conn, owner_ref="a")
    b = await create_keyed(conn, owner_ref="b")
    await create_keyed(conn, depends_on=[a["id"], b["id"]], idempotency_key="after")
    assert (await create_keyed(conn, depends_on=[a["id"], b["id"]], idempotency_key="after"))["created"] is False
    for other in ([b["id"], a["id"]], [a["id"]], None):
        error = await idempotency_conflict(conn, create_keyed(conn, depends_on=other, idempotency_key="after"))
        assert "different depends_on" in str(error)
    assert (await counts(conn))[0] == 3


async def test_the_readme_pipeline_after_the_walkthrough_job_creates_nothing(conn: Conn) -> None:
    """The walk-through made beeline/42/analysis and cancelled it; the telephony pipeline for call 42
    uses the same key for another request: refused, and its transcription is not created either."""
    walkthrough = await create_keyed(conn, **WALKTHROUGH_ANALYSIS)
    await conn.execute("SELECT FROM aiservice.cancel_job($1)", walkthrough["id"])
    before = await counts(conn)
    body = telephony_pipeline()
    error = await idempotency_conflict(conn, create_jobs_keyed(conn, body["jobs"], body["defaults"]))
    assert f'jobs[1]: idempotency_key "beeline/42/analysis" already names job {walkthrough["id"]}' in str(error)
    assert "input, depends_on" in str(error)
    assert await counts(conn) == before
    transcriptions = "SELECT count(*) FROM aiservice.all_jobs WHERE task_type = 'transcribe'"
    assert await conn.fetchval(transcriptions) == 0


async def test_a_repeated_pipeline_answers_the_same_jobs(conn: Conn) -> None:
    body = telephony_pipeline("43")
    first = await create_jobs_keyed(conn, body["jobs"], body["defaults"])
    again = await create_jobs_keyed(conn, body["jobs"], body["defaults"])
    assert [r["created"] for r in first] == [True, True]
    assert [r["created"] for r in again] == [False, False]
    assert [r["id"] for r in again] == [r["id"] for r in first]
    # "$0" resolves to the job item 0 answers: naming that job by its id is the same request.
    by_id = [body["jobs"][0], body["jobs"][1] | {"depends_on": [first[0]["id"]]}]
    assert [r["id"] for r in await create_jobs_keyed(conn, by_id, body["defaults"])] == [r["id"] for r in first]
    # Alone, the analysis names its transcription by id: also the same request.
    alone = await create_jobs_keyed(conn, [by_id[1]], body["defaults"])
    assert (alone[0]["id"], alone[0]["created"]) == (first[1]["id"], False)
    assert await counts(conn) == (2, 1, 1)


async def test_a_repeat_whose_dependency_is_new_is_refused(conn: Conn) -> None:
    body = telephony_pipeline("44")
    first = await create_jobs_keyed(conn, body["jobs"], body["defaults"])
    before = await counts(conn)
    # A new transcription (another key): "$0" is a new job, which the existing analysis does not depend on.
    jobs = [body["jobs"][0] | {"idempotency_key": "beeline/44/transcribe-again"}, body["jobs"][1]]
    error = await idempotency_conflict(conn, create_jobs_keyed(conn, jobs, body["defaults"]))
    assert "jobs[1]: " in str(error) and f"job {first[1]['id']}" in str(error) and "depends_on" in str(error)
    assert await counts(conn) == before


async def test_defaults_are_part_of_the_request(conn: Conn) -> None:
    jobs = [{"owner_ref": "r", "idempotency_key": "d1"}]
    defaults = {"owner_service": "s", "task_type": "t", "model_profile": "m", "priority": 5}
    await create_jobs_keyed(conn, jobs, defaults)
    assert [r["created"] for r in await create_jobs_keyed(conn, jobs, defaults)] == [False]
    # The same job written out without defaults is the same request too.
    spelled = [{"owner_ref": "r", "idempotency_key": "d1", "owner_service": "s", "task_type": "t",
                "model_profile": "m", "priority": 5}]  # fmt: skip
    assert [r["created"] for r in await create_jobs_keyed(conn, spelled)] == [False]
    error = await idempotency_conflict(conn, create_jobs_keyed(conn, jobs, defaults | {"priority": 0}))
    assert "jobs[0]: " in str(error) and "different priority" in str(error)


async def test_one_conflict_refuses_the_whole_batch(conn: Conn) -> None:
    defaults = {"owner_service": "s", "task_type": "t", "model_profile": "m"}
    await create_jobs_keyed(conn, [{"owner_ref": "r", "idempotency_key": "k"}], defaults)
    before = await counts(conn)
    jobs = [{"owner_ref": "new-1"}, {"owner_ref": "other", "idempotency_key": "k"}, {"owner_ref": "new-2"}]
    error = await idempotency_conflict(conn, create_jobs_keyed(conn, jobs, defaults))
    assert json.loads(error.detail or "")["index"] == 1  # type: ignore[attr-defined]
    assert await counts(conn) == before
    # Twice in one batch: the second is a repeat of the first, so it must be the same request too.
    twice = [{"owner_ref": "x", "idempotency_key": "t"}, {"owner_ref": "y", "idempotency_key": "t"}]
    assert "jobs[1]: " in str(await idempotency_conflict(conn, create_jobs_keyed(conn, twice, defaults)))
    assert await counts(conn) == before


# --- Live jobs apart from history: a finished job leaves aiservice.jobs for aiservice.job_history (partitioned by
# day), a retry brings it back, retention drops whole day partitions, and every read answers as if there were one
# table.


async def complete(conn: Conn, claimed: list[asyncpg.Record]) -> list[str]:
    rows = await conn.fetch(
        "SELECT outcome FROM aiservice.complete_jobs('w', $1, $2, $3)",
        [r["id"] for r in claimed],
        [{"text": f"result {r['id']}", "usage": {"total_tokens": 7}} for r in claimed],
        [r["lease_token"] for r in claimed],
    )
    return [r["outcome"] for r in rows]


async def test_an_idempotency_key_names_its_job_live_or_finished(conn: Conn) -> None:
    create = (
        "SELECT (r.job).id, r.created FROM aiservice.create_job('telephony', 'call/1', 'llm_chat', 'qwen',"
        " p_idempotency_key => 'k1') r"
    )
    first, created = await conn.fetchrow(create)
    assert created
    assert tuple(await conn.fetchrow(create)) == (first, False)
    (claimed,) = await claim_tokens(conn)
    await complete(conn, [claimed])
    assert tuple(await conn.fetchrow(create)) == (first, False)  # finished, in job_history
    rows = await conn.fetch(
        "SELECT (j.job).id, j.created FROM aiservice.create_jobs($1, $2) j",
        [{"owner_ref": "call/1", "idempotency_key": "k1"}, {"owner_ref": "call/2", "idempotency_key": "k2"}],
        {"owner_service": "telephony", "task_type": "llm_chat", "model_profile": "qwen"},
    )
    assert tuple(rows[0]) == (first, False) and rows[1]["created"]
    with pytest.raises(asyncpg.PostgresError) as conflict:
        await conn.fetch(
            "SELECT (r.job).id FROM aiservice.create_job('telephony', 'call/9', 'llm_chat', 'qwen',"
            " p_idempotency_key => 'k1') r"
        )
    assert conflict.value.sqlstate == "AS412"


async def test_concurrent_creates_with_one_key_make_one_job(conn: Conn, database_url: str) -> None:
    others = [await asyncpg.connect(database_url) for _ in range(6)]
    try:
        sql = (
            "SELECT (r.job).id FROM aiservice.create_job('telephony', 'call/1', 'llm_chat', 'qwen',"
            " p_idempotency_key => 'same') r"
        )
        ids = await asyncio.gather(*(c.fetchval(sql) for c in others))
    finally:
        for c in others:
            await c.close()
    assert len(set(ids)) == 1
    assert await conn.fetchval("SELECT count(*) FROM aiservice.all_jobs") == 1


# --- The SQL API under concurrent callers on separate connections (SKIP LOCKED, idempotency, fencing).


CREATE_JOB = """
    SELECT (r.job).id, r.created
    FROM aiservice.create_job($1, $2, $3, $4, p_idempotency_key => $5) r
"""


async def test_concurrent_creates_with_one_idempotency_key_make_one_job(conn: Conn, connections: Connections) -> None:
    callers = await connections(8)
    for round_ in range(5):
        key = f"call-{round_}"
        values = [[JOB["owner_service"], "ref", JOB["task_type"], JOB["model_profile"], key] for i in range(8)]
        rows = await together(
            [lambda c=c, v=v: c.fetchrow(CREATE_JOB, *v) for c, v in zip(callers, values, strict=True)]
        )
        assert len({r["id"] for r in rows}) == 1
        assert sorted(r["created"] for r in rows) == [False] * 7 + [True]
        assert await conn.fetchval("SELECT count(*) FROM aiservice.all_jobs WHERE idempotency_key = $1", key) == 1

    # Different requests under one key at once: one is created, the others are refused (AS412).
    values = [[JOB["owner_service"], f"ref/{i}", JOB["task_type"], JOB["model_profile"], "mixed"] for i in range(8)]
    outcomes = await together(
        [
            lambda c=c, v=v: asyncio.gather(c.fetchrow(CREATE_JOB, *v), return_exceptions=True)
            for c, v in zip(callers, values, strict=True)
        ]
    )
    created = [o[0] for o in outcomes if not isinstance(o[0], BaseException)]
    refused = [o[0] for o in outcomes if isinstance(o[0], asyncpg.PostgresError) and o[0].sqlstate == "AS412"]
    assert (len(created), len(refused)) == (1, 7), outcomes
    assert await conn.fetchval("SELECT count(*) FROM aiservice.all_jobs WHERE idempotency_key = 'mixed'") == 1


async def test_concurrent_batches_with_overlapping_keys_make_one_job_per_key(
    conn: Conn, connections: Connections
) -> None:
    # Retried batches overlap, in whatever order the caller rebuilt them.
    callers = await connections(8)
    keys = [f"k{i}" for i in range(300)]
    batches = []
    for i in range(8):
        order = keys if i % 2 == 0 else keys[::-1]
        batches.append([{"owner_ref": k, "idempotency_key": k} for k in order[i * 10 :]])
    results = await together(
        [lambda c=c, b=b: c.fetch(CREATE_JOBS, b, JOB) for c, b in zip(callers, batches, strict=True)]
    )

    ids_by_key: dict[str, set[int]] = {}
    created = 0
    for batch, rows in zip(batches, results, strict=True):
        assert len(rows) == len(batch)
        for job, row in zip(batch, rows, strict=True):
            ids_by_key.setdefault(job["idempotency_key"], set()).add(row["id"])
            created += row["created"]
    assert all(len(ids) == 1 for ids in ids_by_key.values())
    assert created == len(keys)
    assert await conn.fetchval("SELECT count(*) FROM aiservice.all_jobs") == len(keys)
    stored = dict(await conn.fetch("SELECT idempotency_key, id FROM aiservice.all_jobs"))
    assert {k: ids.pop() for k, ids in ids_by_key.items()} == stored


# --- A caller reaching PostgreSQL directly through the SQL API cannot corrupt state.


async def test_fields_that_are_not_arguments_cannot_be_smuggled_in(conn: Conn) -> None:
    """create_jobs reads only its documented fields: status, attempts, leases and results are the lifecycle's."""
    doc = {
        "owner_service": "s",
        "owner_ref": "r",
        "task_type": "t",
        "model_profile": "m",
        "status": "completed",
        "attempts": 99,
        "worker_id": "intruder",
        "lease_token": str(uuid4()),
        "lease_expires_at": "2999-01-01T00:00:00Z",
        "result": {"forged": True},
        "id": 1,
        "created_at": "2000-01-01T00:00:00Z",
    }
    (row,) = await conn.fetch("SELECT (r.job).* FROM aiservice.create_jobs($1::jsonb) r", [doc])
    assert (row["status"], row["attempts"], row["worker_id"], row["lease_token"], row["result"]) == (
        "pending",
        0,
        None,
        None,
        None,
    )
    assert row["created_at"].year > 2000
    # And the stats still work with every job there is.
    assert await conn.fetchval("SELECT aiservice.stats() IS NOT NULL")
