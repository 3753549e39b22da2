"""Idempotency keys: a repeat must be the same request, or it is refused and nothing is created.

Over SQL (create_job, create_jobs: SQLSTATE AS412) and HTTP (409 idempotency_conflict), single and
batch, including the README's scenario: the walk-through's analysis job under the key
beeline/42/analysis, then the telephony pipeline for call 42 under the same key."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from conftest import JSON_HEADERS, ClientFactory

from aiservice.client import AsyncClient, Conflict
from aiservice.db.migrate import load_migrations, migrate
from aiservice.db.pool import connect

Conn: TypeAlias = "asyncpg.Connection[Any]"
Client: TypeAlias = "TestClient[Any, Any]"
API = "/api/v1"

JOB = {"owner_service": "telephony", "owner_ref": "beeline/7", "task_type": "llm_chat", "model_profile": "qwen2.5-14b"}
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


async def create(conn: Conn, **args: Any) -> asyncpg.Record:
    names = list(JOB | args)
    params = ", ".join(f"p_{name} => ${i}" for i, name in enumerate(names, 1))
    row = await conn.fetchrow(
        f"SELECT (r.job).*, r.created FROM aiservice.create_job({params}) r", *(JOB | args).values()
    )
    assert row is not None
    return row


async def create_jobs(conn: Conn, jobs: list[dict[str, Any]], defaults: dict[str, Any] | None = None) -> list[Any]:
    return await conn.fetch("SELECT (r.job).*, r.created FROM aiservice.create_jobs($1, $2) r", jobs, defaults or {})


async def refused(conn: Conn, call: Any) -> asyncpg.PostgresError:
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


# --- SQL: create_job ---------------------------------------------------------------


async def test_the_same_request_answers_the_existing_job(conn: Conn) -> None:
    first = await create(conn, input={"n": 1}, priority=5, max_attempts=2, idempotency_key="k")
    again = await create(conn, input={"n": 1}, priority=5, max_attempts=2, idempotency_key="k")
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
    first = await create(conn, **request)
    error = await refused(conn, create(conn, **(request | change)))
    assert 'idempotency_key "beeline/7/summary" already names job' in str(error)
    assert str(first["id"]) in str(error) and field in str(error)
    detail = json.loads(error.detail or "")  # type: ignore[attr-defined]
    assert detail == {"idempotency_key": "beeline/7/summary", "job_id": first["id"], "fields": [field], "index": None}
    assert (await counts(conn))[0] == 1


async def test_a_field_left_out_is_its_default(conn: Conn) -> None:
    await create(conn, input={}, priority=0, max_attempts=3, idempotency_key="defaults")
    assert (await create(conn, idempotency_key="defaults"))["created"] is False
    await create(conn, priority=5, idempotency_key="priority")
    error = await refused(conn, create(conn, idempotency_key="priority"))
    assert "different priority" in str(error)


async def test_run_at_compares_as_requested_not_as_the_job_moved(conn: Conn) -> None:
    asked = datetime.now(UTC) - timedelta(minutes=5)  # due: claimable now
    job = await create(conn, run_at=asked, idempotency_key="scheduled")
    (claimed,) = await conn.fetch("SELECT id FROM aiservice.claim_jobs('w1')")
    backoff = "SELECT FROM aiservice.fail_job($1, 'w1', 'timeout', 'slow', p_retry_after => '1 hour')"
    await conn.execute(backoff, job["id"])
    moved = await conn.fetchval("SELECT run_at FROM aiservice.all_jobs WHERE id = $1", job["id"])
    assert claimed["id"] == job["id"] and moved > datetime.now(UTC)
    # The job's run_at moved with its backoff; the request is still the same.
    assert (await create(conn, run_at=asked, idempotency_key="scheduled"))["created"] is False
    # Left out where the first gave one, given where the first left it out: different requests.
    assert "different run_at" in str(await refused(conn, create(conn, idempotency_key="scheduled")))
    await create(conn, idempotency_key="asap")
    assert "different run_at" in str(await refused(conn, create(conn, run_at=asked, idempotency_key="asap")))


async def test_dependencies_are_part_of_the_request(conn: Conn) -> None:
    a = await create(conn, owner_ref="a")
    b = await create(conn, owner_ref="b")
    await create(conn, depends_on=[a["id"], b["id"]], idempotency_key="after")
    assert (await create(conn, depends_on=[a["id"], b["id"]], idempotency_key="after"))["created"] is False
    for other in ([b["id"], a["id"]], [a["id"]], None):
        error = await refused(conn, create(conn, depends_on=other, idempotency_key="after"))
        assert "different depends_on" in str(error)
    assert (await counts(conn))[0] == 3


# --- SQL: create_jobs --------------------------------------------------------------


async def test_the_readme_pipeline_after_the_walkthrough_job_creates_nothing(conn: Conn) -> None:
    """The walk-through made beeline/42/analysis and cancelled it; the telephony pipeline for call 42
    uses the same key for another request: refused, and its transcription is not created either."""
    walkthrough = await create(conn, **WALKTHROUGH_ANALYSIS)
    await conn.execute("SELECT FROM aiservice.cancel_job($1)", walkthrough["id"])
    before = await counts(conn)
    body = telephony_pipeline()
    error = await refused(conn, create_jobs(conn, body["jobs"], body["defaults"]))
    assert f'jobs[1]: idempotency_key "beeline/42/analysis" already names job {walkthrough["id"]}' in str(error)
    assert "input, depends_on" in str(error)
    assert await counts(conn) == before
    transcriptions = "SELECT count(*) FROM aiservice.all_jobs WHERE task_type = 'transcribe'"
    assert await conn.fetchval(transcriptions) == 0


async def test_a_repeated_pipeline_answers_the_same_jobs(conn: Conn) -> None:
    body = telephony_pipeline("43")
    first = await create_jobs(conn, body["jobs"], body["defaults"])
    again = await create_jobs(conn, body["jobs"], body["defaults"])
    assert [r["created"] for r in first] == [True, True]
    assert [r["created"] for r in again] == [False, False]
    assert [r["id"] for r in again] == [r["id"] for r in first]
    # "$0" resolves to the job item 0 answers: naming that job by its id is the same request.
    by_id = [body["jobs"][0], body["jobs"][1] | {"depends_on": [first[0]["id"]]}]
    assert [r["id"] for r in await create_jobs(conn, by_id, body["defaults"])] == [r["id"] for r in first]
    # Alone, the analysis names its transcription by id: also the same request.
    alone = await create_jobs(conn, [by_id[1]], body["defaults"])
    assert (alone[0]["id"], alone[0]["created"]) == (first[1]["id"], False)
    assert await counts(conn) == (2, 1, 1)


async def test_a_repeat_whose_dependency_is_new_is_refused(conn: Conn) -> None:
    body = telephony_pipeline("44")
    first = await create_jobs(conn, body["jobs"], body["defaults"])
    before = await counts(conn)
    # A new transcription (another key): "$0" is a new job, which the existing analysis does not depend on.
    jobs = [body["jobs"][0] | {"idempotency_key": "beeline/44/transcribe-again"}, body["jobs"][1]]
    error = await refused(conn, create_jobs(conn, jobs, body["defaults"]))
    assert "jobs[1]: " in str(error) and f"job {first[1]['id']}" in str(error) and "depends_on" in str(error)
    assert await counts(conn) == before


async def test_defaults_are_part_of_the_request(conn: Conn) -> None:
    jobs = [{"owner_ref": "r", "idempotency_key": "d1"}]
    defaults = {"owner_service": "s", "task_type": "t", "model_profile": "m", "priority": 5}
    await create_jobs(conn, jobs, defaults)
    assert [r["created"] for r in await create_jobs(conn, jobs, defaults)] == [False]
    # The same job written out without defaults is the same request too.
    spelled = [{"owner_ref": "r", "idempotency_key": "d1", "owner_service": "s", "task_type": "t",
                "model_profile": "m", "priority": 5}]  # fmt: skip
    assert [r["created"] for r in await create_jobs(conn, spelled)] == [False]
    error = await refused(conn, create_jobs(conn, jobs, defaults | {"priority": 0}))
    assert "jobs[0]: " in str(error) and "different priority" in str(error)


async def test_one_conflict_refuses_the_whole_batch(conn: Conn) -> None:
    defaults = {"owner_service": "s", "task_type": "t", "model_profile": "m"}
    await create_jobs(conn, [{"owner_ref": "r", "idempotency_key": "k"}], defaults)
    before = await counts(conn)
    jobs = [{"owner_ref": "new-1"}, {"owner_ref": "other", "idempotency_key": "k"}, {"owner_ref": "new-2"}]
    error = await refused(conn, create_jobs(conn, jobs, defaults))
    assert json.loads(error.detail or "")["index"] == 1  # type: ignore[attr-defined]
    assert await counts(conn) == before
    # Twice in one batch: the second is a repeat of the first, so it must be the same request too.
    twice = [{"owner_ref": "x", "idempotency_key": "t"}, {"owner_ref": "y", "idempotency_key": "t"}]
    assert "jobs[1]: " in str(await refused(conn, create_jobs(conn, twice, defaults)))
    assert await counts(conn) == before


# --- HTTP --------------------------------------------------------------------------


async def test_http_single_create_repeats_with_200_and_refuses_with_409(api: Client) -> None:
    first = await api.post(f"{API}/jobs", json=WALKTHROUGH_ANALYSIS)
    assert first.status == 201
    job = await first.json()
    again = await api.post(f"{API}/jobs", json=WALKTHROUGH_ANALYSIS)
    assert again.status == 200 and (await again.json())["id"] == job["id"]

    other = await api.post(f"{API}/jobs", json=WALKTHROUGH_ANALYSIS | {"priority": 1})
    assert other.status == 409
    error = (await other.json())["error"]
    assert error["code"] == "idempotency_conflict"
    assert "beeline/42/analysis" in error["message"] and str(job["id"]) in error["message"]
    assert error["details"] == {
        "idempotency_key": "beeline/42/analysis",
        "job_id": job["id"],
        "fields": ["priority"],
        "index": None,
    }


async def test_http_readme_scenario_batch_is_refused_whole(api: Client) -> None:
    created = await (await api.post(f"{API}/jobs", json=WALKTHROUGH_ANALYSIS)).json()
    assert (await api.post(f"{API}/jobs/{created['id']}/cancel", headers=JSON_HEADERS)).status == 200

    response = await api.post(f"{API}/jobs/batch", json=telephony_pipeline())
    assert response.status == 409, await response.text()
    error = (await response.json())["error"]
    assert error["code"] == "idempotency_conflict"
    assert error["details"] == {
        "idempotency_key": "beeline/42/analysis",
        "job_id": created["id"],
        "fields": ["input", "depends_on"],
        "index": 1,
    }
    listed = await (await api.get(f"{API}/jobs", params={"owner_service": "telephony"})).json()
    assert [j["id"] for j in listed["jobs"]] == [created["id"]]  # no transcription was created


async def test_http_identical_batch_repeat_answers_the_same_jobs(api: Client) -> None:
    body = telephony_pipeline("45")
    first = await api.post(f"{API}/jobs/batch", json=body)
    again = await api.post(f"{API}/jobs/batch", json=body)
    assert (first.status, again.status) == (201, 201)
    one, two = await first.json(), await again.json()
    assert [j["id"] for j in two["jobs"]] == [j["id"] for j in one["jobs"]]
    assert two["batch_id"] is None


async def test_the_client_raises_conflict_for_the_readme_scenario(api_factory: ClientFactory) -> None:
    api = await api_factory(service_token="t")
    async with AsyncClient(str(api.make_url("")).rstrip("/"), token="t") as client:
        job = await client.create_job(**WALKTHROUGH_ANALYSIS)
        body = telephony_pipeline()
        with pytest.raises(Conflict) as caught:
            await client.create_jobs(body["jobs"], defaults=body["defaults"])
    assert caught.value.status == 409 and caught.value.code == "idempotency_conflict"
    assert caught.value.details["job_id"] == job.id


async def test_jobs_made_before_requests_were_kept_repeat_without_a_run_at_conflict(empty_database_url: str) -> None:
    """A keyed job created before migration 0014 has no requested run_at: an identical repeat after
    the upgrade answers it, on run_at as on every other field (the others are still compared)."""
    conn = await connect(empty_database_url)
    try:
        await migrate(conn, [m for m in load_migrations() if m.name < "0014"], functions=[])
        await conn.execute(
            "INSERT INTO aiservice.jobs (owner_service, owner_ref, task_type, model_profile, run_at, scheduled,"
            " idempotency_key) VALUES ('s', 'r', 't', 'm', '2030-01-01T00:00:00Z', true, 'k1')"
        )
        await migrate(conn)
        args = {"p_owner_service": "s", "p_owner_ref": "r", "p_task_type": "t", "p_model_profile": "m",
                "p_idempotency_key": "k1"}  # fmt: skip
        at = datetime(2030, 1, 1, tzinfo=UTC)
        row = await conn.fetchrow(
            "SELECT (r.job).id, r.created FROM aiservice.create_job(p_owner_service => $1, p_owner_ref => $2,"
            " p_task_type => $3, p_model_profile => $4, p_idempotency_key => $5, p_run_at => $6) r",
            *args.values(), at,
        )  # fmt: skip
        assert row is not None and row["created"] is False
        with pytest.raises(asyncpg.PostgresError, match="different owner_ref"):
            await conn.execute(
                "SELECT aiservice.create_job(p_owner_service => 's', p_owner_ref => 'other', p_task_type => 't',"
                " p_model_profile => 'm', p_idempotency_key => 'k1')"
            )
    finally:
        await conn.close()
