"""Idempotency keys: a repeat must be the same request, or it is refused and nothing is created.

Over HTTP (409 idempotency_conflict) and the client, single and batch, including the README's
scenario: the walk-through's analysis job under the key beeline/42/analysis, then the telephony
pipeline for call 42 under the same key. Over SQL (SQLSTATE AS412): tests/sql/test_create.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeAlias

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from conftest import JSON_HEADERS, ClientFactory

from aiservice.client import AsyncClient, Conflict
from aiservice.db.migrate import load_migrations, migrate
from aiservice.db.pool import connect

Client: TypeAlias = "TestClient[Any, Any]"
API = "/api/v1"

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


# --- SQL: create_job ---------------------------------------------------------------


# --- SQL: create_jobs --------------------------------------------------------------


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
