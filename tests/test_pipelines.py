"""Pipelines: jobs that wait for other jobs and use their results.

Over HTTP and through the built-in workers (the SQL functions: tests/sql/test_pipelines.py). Real
PostgreSQL; the built-in workers against the stub WhisperX and OpenAI-compatible servers,
speaking real HTTP."""

from __future__ import annotations

import base64
import json
from typing import Any, TypeAlias

import asyncpg
import pytest
import stubs
from conftest import ClientFactory
from sqlapi import create, create_jobs
from stubs import OpenAIStub, WorkerFactory, wait_for_status

from aiservice.db.store import JobStore
from aiservice.jobs import Job
from aiservice.worker.failure import JobFailure
from aiservice.worker.placeholders import fill_messages

Conn: TypeAlias = "asyncpg.Connection[Any]"
API = "/api/v1"

openai_stub = stubs.openai_stub
asr_stub = stubs.asr_stub
worker_factory = stubs.worker_factory

AUDIO = base64.b64encode(b"call audio").decode()


def transcribe(owner_ref: str = "call/1") -> dict[str, Any]:
    return {"owner_ref": owner_ref, "task_type": "transcribe", "model_profile": "whisperx",
            "input": {"audio_base64": AUDIO, "language": "en"}}  # fmt: skip


def analyse(prompt: str, *depends_on: int | str) -> dict[str, Any]:
    return {"owner_ref": "call/1", "task_type": "call_analysis", "model_profile": "qwen2.5-14b",
            "input": {"system": "Classify the call.", "user": prompt}, "depends_on": list(depends_on)}  # fmt: skip


async def sql_jobs(conn: Conn, jobs: list[dict[str, Any]]) -> list[asyncpg.Record]:
    return await create_jobs(conn, jobs, {"owner_service": "telephony", "task_type": "t", "model_profile": "m"})


async def complete(conn: Conn, job_id: int, result: dict[str, Any]) -> None:
    await conn.execute("SELECT FROM aiservice.complete_job($1, 'w1', $2)", job_id, result)


async def status(conn: Conn, job_id: int) -> tuple[str, bool, str | None, str | None]:
    row = await conn.fetchrow(
        "SELECT status::text, blocked, error_category, error_message FROM aiservice.all_jobs WHERE id = $1", job_id
    )
    assert row is not None
    return row["status"], row["blocked"], row["error_category"], row["error_message"]


async def test_bad_dependencies_over_http(api_factory: ClientFactory) -> None:
    api = await api_factory()
    body = {"owner_service": "t", "owner_ref": "r", "task_type": "t", "model_profile": "m"}
    for depends_on in (["$0"], [987654321], [0], "x"):
        response = await api.post(f"{API}/jobs", json=body | {"depends_on": depends_on})
        assert response.status == 422, (depends_on, await response.text())
    cycle = {"defaults": body, "jobs": [{"depends_on": ["$1"]}, {"depends_on": ["$0"]}]}
    response = await api.post(f"{API}/jobs/batch", json=cycle)
    assert response.status == 422 and "cycle" in (await response.json())["error"]["message"]


async def test_transcribe_then_analyse_in_one_batch_request(
    store: JobStore, api_factory: ClientFactory, worker_factory: WorkerFactory, openai_stub: OpenAIStub
) -> None:
    api = await api_factory()
    await worker_factory()
    prompt = "Transcript: {{dependencies.0.result.text}} (\\{{kept}})"
    body = {"defaults": {"owner_service": "telephony"}, "jobs": [transcribe(), analyse(prompt, "$0")]}
    created = await (await api.post(f"{API}/jobs/batch", json=body)).json()
    transcription, analysis = created["jobs"]
    assert analysis["blocked"] is True

    done = await wait_for_status(store, analysis["id"], "completed", within=20)
    assert done.result is not None
    assert done.result["content"] == "echo: Transcript: Hello there. General Kenobi. ({{kept}})"
    assert (await store.get_job(transcription["id"])).status == "completed"
    assert (await store.get_batch(created["batch_id"])).status == "finished"


async def test_one_analysis_over_three_transcriptions(
    store: JobStore, api_factory: ClientFactory, worker_factory: WorkerFactory, openai_stub: OpenAIStub
) -> None:
    api = await api_factory()
    await worker_factory()
    prompt = "{{dependencies.0.result.language}}|{{dependencies.1.id}}|{{dependencies.2.result.segments.1.text}}"
    jobs = [transcribe("c/1"), transcribe("c/2"), transcribe("c/3"), analyse(prompt, "$0", "$1", "$2")]
    body = {"defaults": {"owner_service": "telephony"}, "jobs": jobs}
    created = await (await api.post(f"{API}/jobs/batch", json=body)).json()
    ids = [j["id"] for j in created["jobs"]]
    done = await wait_for_status(store, ids[3], "completed", within=20)
    assert done.result is not None
    assert done.result["content"] == f"echo: en|{ids[1]}|General Kenobi."


async def test_a_placeholder_that_does_not_resolve_fails_the_job(
    store: JobStore, api_factory: ClientFactory, worker_factory: WorkerFactory, openai_stub: OpenAIStub
) -> None:
    api = await api_factory()
    await worker_factory()
    body = {"defaults": {"owner_service": "telephony"},
            "jobs": [transcribe(), analyse("{{dependencies.0.result.summary}}", "$0")]}  # fmt: skip
    created = await (await api.post(f"{API}/jobs/batch", json=body)).json()
    failed = await wait_for_status(store, created["jobs"][1]["id"], "failed", within=20)
    assert failed.error_category == "invalid_input"
    assert failed.error_message is not None and "{{dependencies.0.result.summary}}" in failed.error_message


# --- depends_on lists each job once; a claim's dependency results are bounded ----------------


async def test_a_job_listed_twice_in_depends_on_is_refused(conn: Conn, api_factory: ClientFactory) -> None:
    a = await create(conn, owner_ref="a", idempotency_key="a")
    twice = f"lists job {a['id']} more than once"
    with pytest.raises(asyncpg.PostgresError) as refused:
        await create(conn, depends_on=[a["id"]] * 100)
    assert refused.value.sqlstate == "AS422" and twice in str(refused.value)
    for jobs in (
        [{"owner_ref": "b", "depends_on": [a["id"], a["id"]]}],
        [{"owner_ref": "b"}, {"owner_ref": "c", "depends_on": ["$0", "$0"]}],
        # "$0" is a repeat of job a: naming a again by its id names it twice.
        [{"owner_ref": "a", "idempotency_key": "a"}, {"owner_ref": "c", "depends_on": ["$0", a["id"]]}],
    ):
        with pytest.raises(asyncpg.PostgresError) as refused:
            await sql_jobs(conn, jobs)
        assert refused.value.sqlstate == "AS422" and "more than once" in str(refused.value), jobs
    assert await conn.fetchval("SELECT count(*) FROM aiservice.all_jobs") == 1
    assert await conn.fetchval("SELECT count(*) FROM aiservice.job_dependencies") == 0

    api = await api_factory()
    body = {"owner_service": "t", "owner_ref": "r", "task_type": "t", "model_profile": "m"}
    response = await api.post(f"{API}/jobs", json=body | {"depends_on": [a["id"]] * 3})
    assert response.status == 422 and twice in (await response.json())["error"]["message"]
    response = await api.post(f"{API}/jobs/batch", json={"defaults": body, "jobs": [{}, {"depends_on": ["$0", "$0"]}]})
    error = (await response.json())["error"]
    assert response.status == 422 and "jobs[1].depends_on lists job" in error["message"], error


MIB = 1024 * 1024
JOB_ROW: dict[str, Any] = {
    "owner_service": "s", "owner_ref": "r", "task_type": "t", "model_profile": "m", "input": {}, "result": None,
    "status": "completed", "priority": 0, "run_at": "2030-01-01T00:00:00Z", "attempts": 1, "max_attempts": 3,
    "error_category": None, "error_message": None, "worker_id": None, "lease_token": None, "lease_expires_at": None,
    "idempotency_key": None, "created_at": "2030-01-01T00:00:00Z", "started_at": None, "finished_at": None,
    "updated_at": "2030-01-01T00:00:00Z", "batch_id": None, "blocked": False,
}  # fmt: skip


async def finished_with(conn: Conn, results: list[dict[str, Any]]) -> list[int]:
    """Jobs of task type "dep", completed with these results."""
    ids = [(await create(conn, owner_ref=f"dep/{i}", task_type="dep"))["id"] for i in range(len(results))]
    claimed = await conn.fetch("SELECT id FROM aiservice.claim_jobs('w1', $1, p_task_types => '{dep}')", len(ids))
    assert sorted(r["id"] for r in claimed) == ids
    for job_id, result in zip(ids, results, strict=True):
        await complete(conn, job_id, result)
    return ids


async def test_the_http_claim_answer_is_bounded_by_the_setting(conn: Conn, api_factory: ClientFactory) -> None:
    ids = await finished_with(conn, [{"text": str(i) * MIB} for i in range(6)])
    for n in range(3):  # three claimed jobs depending on the same six results
        await create(conn, owner_ref=f"analysis/{n}", depends_on=ids)
    await conn.execute("SELECT aiservice.maintain()")
    api = await api_factory(claim_dependency_bytes=2 * MIB)
    response = await api.post(f"{API}/jobs/claim", json={"worker_id": "w2", "limit": 3})
    assert response.status == 200
    body = await response.read()
    assert len(body) < 2 * MIB + 64 * 1024, len(body)  # 18 MiB of results without the bound
    jobs = json.loads(body)["jobs"]
    assert len(jobs) == 3
    assert [d["id"] for j in jobs for d in j["dependencies"]] == ids * 3
    assert sum(not d["result_omitted"] for j in jobs for d in j["dependencies"]) == 1


async def test_the_worker_reads_the_results_a_claim_left_out(
    store: JobStore, api_factory: ClientFactory, worker_factory: WorkerFactory, openai_stub: OpenAIStub
) -> None:
    api = await api_factory()
    await worker_factory(claim_dependency_bytes=1)  # every result is left out of the claim
    prompt = "Transcript: {{dependencies.0.result.text}} / {{dependencies.0.id}}"
    body = {"defaults": {"owner_service": "telephony"}, "jobs": [transcribe(), analyse(prompt, "$0")]}
    created = await (await api.post(f"{API}/jobs/batch", json=body)).json()
    transcription, analysis = created["jobs"]
    done = await wait_for_status(store, analysis["id"], "completed", "failed", within=20)
    assert done.result is not None, done.error_message
    assert done.result["content"] == f"echo: Transcript: Hello there. General Kenobi. / {transcription['id']}"


# --- a dependency that no longer exists keeps its place ----------------------------------------


async def test_a_placeholder_for_a_deleted_dependency_fails_the_job_naming_it(
    conn: Conn, store: JobStore, worker_factory: WorkerFactory, openai_stub: OpenAIStub
) -> None:
    a, b = await finished_with(conn, [{"text": "notes of job A"}, {"text": "SECRET notes of job B"}])
    job = await create(
        conn,
        task_type="call_analysis",
        model_profile="qwen2.5-14b",
        input={"user": "Summarise: {{dependencies.0.result.text}}"},
        depends_on=[a, b],
    )
    await conn.execute("SELECT aiservice.maintain()")
    await conn.execute("DELETE FROM aiservice.job_history WHERE id = $1", a)
    await worker_factory()
    failed = await wait_for_status(store, job["id"], "failed", "completed", within=20)
    assert failed.result is None, failed.result  # never another job's result
    assert failed.error_category == "invalid_input"
    assert failed.error_message is not None
    assert f"dependency 0 (job {a})" in failed.error_message and "no longer exists" in failed.error_message


async def test_placeholders_read_only_the_left_out_results_they_use() -> None:
    dependencies = [
        {"id": 1, "task_type": "t", "model_profile": "m", "status": "completed", "result": None,
         "result_omitted": True},
        {"id": 2, "task_type": "t", "model_profile": "m", "status": "completed", "result": None,
         "result_omitted": True},
        {"id": 3, "task_type": None, "model_profile": None, "status": None, "result": None, "deleted": True},
    ]  # fmt: skip
    reads: list[int] = []

    async def read(job_id: int) -> Job:
        reads.append(job_id)
        return Job.model_validate(JOB_ROW | {"id": job_id, "result": {"text": f"result of {job_id}"}})

    filled = await fill_messages([{"role": "user", "content": "{{dependencies.1.result.text}} {{dependencies.0.id}}"}],
                                 dependencies, read)  # fmt: skip
    assert filled[0]["content"] == "result of 2 1"
    assert reads == [2]  # dependency 0's result was not used, so not read

    for content, expected in [
        ("{{dependencies.2.result.text}}", "names dependency 2 (job 3), which no longer exists"),
        ("{{dependencies.2.id}}", "names dependency 2 (job 3), which no longer exists"),
    ]:
        with pytest.raises(JobFailure) as failed:
            await fill_messages([{"role": "user", "content": content}], dependencies, read)
        assert failed.value.category == "invalid_input" and expected in failed.value.message
    with pytest.raises(JobFailure) as failed:  # no reader: named, never filled with null
        await fill_messages([{"role": "user", "content": "{{dependencies.0.result}}"}], dependencies, None)
    assert "was not read" in failed.value.message
