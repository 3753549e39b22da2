"""Every endpoint of the HTTP API through a real aiohttp client over a real PostgreSQL."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from conftest import JSON_HEADERS, job_spec

from aiservice.api.app import create_app
from aiservice.db.pool import create_pool
from aiservice.db.store import JobStore
from aiservice.settings import Settings

Client = TestClient[Any, Any]
API = "/api/v1"

JOB_COLUMNS = {
    "id",
    "batch_id",
    "blocked",
    "owner_service",
    "owner_ref",
    "task_type",
    "model_profile",
    "input",
    "result",
    "status",
    "priority",
    "run_at",
    "attempts",
    "max_attempts",
    "error_category",
    "error_message",
    "worker_id",
    "lease_token",
    "lease_expires_at",
    "idempotency_key",
    "created_at",
    "started_at",
    "finished_at",
    "updated_at",
}

_unique = itertools.count(1)


def ts(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, f"timestamp without offset: {value}"
    return parsed


async def ok(response: ClientResponse, status: int = 200) -> Any:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    return await response.json()


async def refused(response: ClientResponse, status: int, code: str | None = None) -> dict[str, Any]:
    """Assert the one error shape and return its inner object."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert isinstance(error["code"], str)
    assert error["code"]
    assert isinstance(error["message"], str)
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    return dict(error)


async def create(api: Client, **overrides: Any) -> dict[str, Any]:
    job: dict[str, Any] = await ok(await api.post(f"{API}/jobs", json=job_spec(**overrides)), 201)
    return job


async def get(api: Client, job_id: int) -> dict[str, Any]:
    job: dict[str, Any] = await ok(await api.get(f"{API}/jobs/{job_id}"))
    return job


async def claim(api: Client, worker_id: str = "w1", **body: Any) -> list[dict[str, Any]]:
    reply = await ok(await api.post(f"{API}/jobs/claim", json={"worker_id": worker_id} | body))
    assert set(reply) == {"jobs"}
    jobs: list[dict[str, Any]] = reply["jobs"]
    return jobs


async def running(api: Client, worker_id: str = "w1", **overrides: Any) -> dict[str, Any]:
    """A job claimed by worker_id (a task type of its own, so no other job is claimed)."""
    task_type = f"task_{next(_unique)}"
    created = await create(api, task_type=task_type, **overrides)
    (job,) = await claim(api, worker_id, task_types=[task_type])
    assert job["id"] == created["id"]
    return job


async def failed(api: Client, category: str = "bad_output", **overrides: Any) -> dict[str, Any]:
    job = await running(api, **overrides)
    body = {"worker_id": job["worker_id"], "error_category": category, "error_message": "boom", "retryable": False}
    done: dict[str, Any] = await ok(await api.post(f"{API}/jobs/{job['id']}/fail", json=body))
    assert done["status"] == "failed"
    return done


async def completed(api: Client, **overrides: Any) -> dict[str, Any]:
    job = await running(api, **overrides)
    body = {"worker_id": job["worker_id"], "result": {"content": "done"}}
    done: dict[str, Any] = await ok(await api.post(f"{API}/jobs/{job['id']}/complete", json=body))
    return done


async def list_ids(api: Client, **params: Any) -> list[int]:
    page = await ok(await api.get(f"{API}/jobs", params=params))
    return [j["id"] for j in page["jobs"]]


async def count_jobs(api: Client) -> int:
    return len(await list_ids(api, limit=500))


# --- create -------------------------------------------------------------------


async def test_create_returns_201_and_the_job_with_every_column(api: Client) -> None:
    body = job_spec(input={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    response = await api.post(f"{API}/jobs", json=body)
    job = await ok(response, 201)

    assert set(job) == JOB_COLUMNS
    assert isinstance(job["id"], int)
    for field in ("owner_service", "owner_ref", "task_type", "model_profile", "input"):
        assert job[field] == body[field]
    assert job["status"] == "pending"
    assert job["priority"] == 0
    assert job["attempts"] == 0
    assert job["max_attempts"] == 3
    for field in ("result", "error_category", "error_message", "worker_id", "lease_token", "lease_expires_at"):
        assert job[field] is None
    assert job["idempotency_key"] is None
    assert job["started_at"] is None
    assert job["finished_at"] is None
    # Not before: now, the moment of creation.
    assert ts(job["run_at"]) == ts(job["created_at"]) == ts(job["updated_at"])
    assert await get(api, job["id"]) == job


async def test_create_takes_priority_run_at_max_attempts_and_idempotency_key(api: Client) -> None:
    run_at = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    job = await create(api, priority=-7, run_at="2031-05-06T10:08:09+03:00", max_attempts=5, idempotency_key="call-1")
    assert job["priority"] == -7
    assert ts(job["run_at"]) == run_at
    assert job["max_attempts"] == 5
    assert job["idempotency_key"] == "call-1"
    # Not claimable before run_at.
    assert await claim(api, task_types=[job["task_type"]]) == []


async def test_repeated_idempotency_key_returns_the_existing_job_and_creates_nothing(api: Client) -> None:
    spec = job_spec(idempotency_key="call-42")
    first = await ok(await api.post(f"{API}/jobs", json=spec), 201)

    again = await api.post(f"{API}/jobs", json=spec)
    assert await ok(again, 200) == first
    assert await count_jobs(api) == 1
    # Another request under the same key is refused (test_idempotency.py has the details).
    other_input = await api.post(f"{API}/jobs", json=spec | {"input": {"other": True}})
    await refused(other_input, 409, "idempotency_conflict")
    assert await count_jobs(api) == 1

    # The key is unique per owner_service: another caller may use the same key.
    other = await create(api, owner_service="monitoring-tg", idempotency_key="call-42")
    assert other["id"] != first["id"]
    assert await count_jobs(api) == 2

    # The existing job is returned whatever became of it.
    await api.post(f"{API}/jobs/{first['id']}/cancel", headers=JSON_HEADERS)
    repeat = await ok(await api.post(f"{API}/jobs", json=spec), 200)
    assert repeat["id"] == first["id"]
    assert repeat["status"] == "cancelled"
    assert await count_jobs(api) == 2


# --- list -----------------------------------------------------------------------


async def test_list_is_newest_first_with_the_page_shape(api: Client) -> None:
    ids = [(await create(api))["id"] for _ in range(3)]
    page = await ok(await api.get(f"{API}/jobs"))
    assert set(page) == {"jobs", "next_cursor"}
    assert [j["id"] for j in page["jobs"]] == sorted(ids, reverse=True)
    assert all(set(j) == JOB_COLUMNS for j in page["jobs"])
    assert page["next_cursor"] is None


async def test_list_filters_by_each_field(api: Client) -> None:
    a = await create(api, owner_service="telephony", owner_ref="beeline/1", task_type="llm_chat", model_profile="qwen")
    b = await create(api, owner_service="telephony", owner_ref="beeline/2", task_type="transcribe", model_profile="wx")
    c = await create(
        api, owner_service="monitoring-tg", owner_ref="beeline/1", task_type="llm_chat", model_profile="wx"
    )

    cases: list[tuple[dict[str, str], list[dict[str, Any]]]] = [
        ({"owner_service": "telephony"}, [a, b]),
        ({"owner_service": "monitoring-tg"}, [c]),
        ({"owner_ref": "beeline/1"}, [a, c]),
        ({"task_type": "llm_chat"}, [a, c]),
        ({"task_type": "transcribe"}, [b]),
        ({"model_profile": "wx"}, [b, c]),
        ({"owner_service": "telephony", "owner_ref": "beeline/1"}, [a]),
        ({"owner_service": "telephony", "model_profile": "wx", "task_type": "transcribe"}, [b]),
        ({"owner_service": "nobody"}, []),
    ]
    for params, expected in cases:
        assert await list_ids(api, **params) == sorted((j["id"] for j in expected), reverse=True), params


async def test_list_filters_by_status_single_and_repeated(api: Client) -> None:
    pending = await create(api)
    run = await running(api)
    done = await completed(api)
    fail = await failed(api)
    cancelled = await create(api)
    await ok(await api.post(f"{API}/jobs/{cancelled['id']}/cancel", headers=JSON_HEADERS))

    assert await list_ids(api, status="pending") == [pending["id"]]
    assert await list_ids(api, status="running") == [run["id"]]
    assert await list_ids(api, status="completed") == [done["id"]]
    assert await list_ids(api, status="failed") == [fail["id"]]
    assert await list_ids(api, status="cancelled") == [cancelled["id"]]

    both = await ok(await api.get(f"{API}/jobs?status=pending&status=failed"))
    assert [j["id"] for j in both["jobs"]] == sorted([pending["id"], fail["id"]], reverse=True)
    every = "&".join(f"status={s}" for s in ("pending", "running", "completed", "failed", "cancelled"))
    assert len((await ok(await api.get(f"{API}/jobs?{every}")))["jobs"]) == 5


async def test_list_filters_by_creation_time(api: Client, store: JobStore) -> None:
    jobs = [await create(api) for _ in range(3)]
    stamps = ["2024-01-01T00:00:00+00:00", "2024-06-01T00:00:00+00:00", "2025-01-01T00:00:00+00:00"]
    for job, stamp in zip(jobs, stamps, strict=True):
        await store.pool.execute(
            "UPDATE aiservice.jobs SET created_at = $1 WHERE id = $2", datetime.fromisoformat(stamp), job["id"]
        )
    old, middle, new = (j["id"] for j in jobs)

    # created_after is inclusive, created_before exclusive; any offset is understood.
    assert await list_ids(api, created_after="2024-06-01T00:00:00Z") == [new, middle]
    assert await list_ids(api, created_after="2024-06-01T02:00:00+02:00") == [new, middle]
    assert await list_ids(api, created_before="2024-06-01T00:00:00Z") == [old]
    assert await list_ids(api, created_after="2024-02-01T00:00:00Z", created_before="2024-12-31T00:00:00Z") == [middle]
    assert await list_ids(api, created_after="2030-01-01T00:00:00Z") == []


async def test_list_limit_defaults_to_50_and_is_capped(api: Client) -> None:
    batch = {"defaults": job_spec(), "jobs": [{"owner_ref": f"r/{i}"} for i in range(60)]}
    created = (await ok(await api.post(f"{API}/jobs/batch", json=batch), 201))["jobs"]
    newest_first = sorted((j["id"] for j in created), reverse=True)

    page = await ok(await api.get(f"{API}/jobs"))
    assert [j["id"] for j in page["jobs"]] == newest_first[:50]
    assert page["next_cursor"] == str(newest_first[49])

    page = await ok(await api.get(f"{API}/jobs", params={"limit": "500"}))
    assert len(page["jobs"]) == 60
    assert page["next_cursor"] is None

    page = await ok(await api.get(f"{API}/jobs", params={"limit": "7"}))
    assert len(page["jobs"]) == 7

    for too_many in ("501", "1000000", "0", "-1"):
        await refused(await api.get(f"{API}/jobs", params={"limit": too_many}), 422, "invalid_argument")


async def walk(api: Client, **params: Any) -> tuple[list[int], int]:
    """Follow next_cursor to the end; return every id seen and the number of pages."""
    seen: list[int] = []
    cursor: str | None = None
    for pages in itertools.count(1):
        query = params | ({"cursor": cursor} if cursor else {})
        page = await ok(await api.get(f"{API}/jobs", params=query))
        seen.extend(j["id"] for j in page["jobs"])
        cursor = page["next_cursor"]
        if cursor is None:
            return seen, pages
        assert pages < 100, "pagination does not end"
    raise AssertionError("unreachable")


async def test_keyset_pagination_walks_every_job_once(api: Client) -> None:
    batch = {"defaults": job_spec(), "jobs": [{"owner_ref": f"r/{i}"} for i in range(25)]}
    created = (await ok(await api.post(f"{API}/jobs/batch", json=batch), 201))["jobs"]
    newest_first = sorted((j["id"] for j in created), reverse=True)

    for limit in (5, 7, 1, 25, 26):
        seen, pages = await walk(api, limit=limit)
        assert len(seen) == len(set(seen)) == 25, limit
        assert seen == newest_first, limit
        # A full last page may still carry a cursor, which then leads to an empty page.
        full_pages = -(-25 // limit)
        assert pages in ({full_pages, full_pages + 1} if 25 % limit == 0 else {full_pages}), limit
    seen, pages = await walk(api)
    assert (seen, pages) == (newest_first, 1)

    # A job created while walking lands on no page of the walk already under way (it is newer).
    first = await ok(await api.get(f"{API}/jobs", params={"limit": 5}))
    newcomer = await create(api)
    second = await ok(await api.get(f"{API}/jobs", params={"limit": 5, "cursor": first["next_cursor"]}))
    assert newcomer["id"] not in [j["id"] for j in first["jobs"] + second["jobs"]]
    assert [j["id"] for j in second["jobs"]] == seen[5:10]


async def test_pagination_keeps_the_filters(api: Client) -> None:
    mine: list[int] = []
    for i in range(14):
        job = await create(api, owner_service="telephony" if i % 2 else "monitoring-pf")
        if i % 2:
            mine.append(job["id"])
    seen, _ = await walk(api, owner_service="telephony", limit=3)
    assert seen == sorted(mine, reverse=True)


# --- batch ----------------------------------------------------------------------


async def test_batch_merges_defaults_and_returns_201_with_the_jobs_in_order(api: Client) -> None:
    defaults = {
        "owner_service": "monitoring-tg",
        "task_type": "tg_analysis",
        "model_profile": "qwen2.5-14b",
        "priority": 5,
        "max_attempts": 4,
        "input": {"lang": "ru"},
    }
    jobs = [
        {"owner_ref": "channel/1"},
        {"owner_ref": "channel/2", "priority": 9, "input": {"text": "hi"}, "model_profile": "vision"},
        {"owner_ref": "channel/3", "idempotency_key": "msg-3", "run_at": "2031-01-01T00:00:00Z"},
    ]
    reply = await ok(await api.post(f"{API}/jobs/batch", json={"defaults": defaults, "jobs": jobs}), 201)
    assert set(reply) == {"batch_id", "jobs"}
    one, two, three = reply["jobs"]
    assert one["batch_id"] == two["batch_id"] == three["batch_id"] == reply["batch_id"] is not None

    assert [j["owner_ref"] for j in reply["jobs"]] == ["channel/1", "channel/2", "channel/3"]
    assert all(set(j) == JOB_COLUMNS for j in reply["jobs"])
    assert all(j["owner_service"] == "monitoring-tg" and j["task_type"] == "tg_analysis" for j in reply["jobs"])
    assert all(j["max_attempts"] == 4 and j["status"] == "pending" for j in reply["jobs"])
    assert (one["priority"], one["input"], one["model_profile"]) == (5, {"lang": "ru"}, "qwen2.5-14b")
    # A job's own field replaces the default as a whole (input is not deep-merged).
    assert (two["priority"], two["input"], two["model_profile"]) == (9, {"text": "hi"}, "vision")
    assert three["idempotency_key"] == "msg-3"
    assert ts(three["run_at"]) == datetime(2031, 1, 1, tzinfo=UTC)
    for job in reply["jobs"]:
        assert await get(api, job["id"]) == job


async def test_batch_without_defaults_and_with_idempotency_keys(api: Client) -> None:
    k1 = job_spec(owner_service="telephony", idempotency_key="k1")
    k2 = job_spec(owner_service="telephony", idempotency_key="k2")
    existing = await ok(await api.post(f"{API}/jobs", json=k1), 201)
    jobs = [k1, k2, k2]
    reply = await ok(await api.post(f"{API}/jobs/batch", json={"jobs": jobs}), 201)
    first, second, third = reply["jobs"]
    assert first == existing
    assert second["id"] == third["id"] != existing["id"]
    assert await count_jobs(api) == 2


async def test_batch_refuses_a_job_missing_a_field_after_defaults_and_creates_nothing(api: Client) -> None:
    batch = {"defaults": {"owner_service": "telephony"}, "jobs": [job_spec(), {"owner_ref": "x", "task_type": "t"}]}
    error = await refused(await api.post(f"{API}/jobs/batch", json=batch), 422, "invalid_argument")
    assert "model_profile" in error["message"]
    await refused(await api.post(f"{API}/jobs/batch", json={"jobs": []}), 422, "invalid_argument")
    assert await count_jobs(api) == 0


async def test_batch_errors_name_the_job_by_its_index(api: Client) -> None:
    """The defaults go to SQL unmerged; what a job lacks, or holds wrongly, is still named by its index."""
    defaults = {"owner_service": "telephony", "task_type": "t"}
    jobs = [{"owner_ref": "a", "model_profile": "m"}, {"owner_ref": "b"}, {"model_profile": "m"}]
    error = await refused(await api.post(f"{API}/jobs/batch", json={"defaults": defaults, "jobs": jobs}), 422)
    assert [d["loc"] for d in error["details"]] == [["jobs", 1, "model_profile"], ["jobs", 2, "owner_ref"]]
    assert error["message"].startswith("jobs.1.model_profile: ")
    jobs = [{"owner_ref": "a", "model_profile": "m"}, {"owner_ref": "b", "model_profile": "m", "priority": 5000}]
    error = await refused(await api.post(f"{API}/jobs/batch", json={"defaults": defaults, "jobs": jobs}), 422)
    assert [d["loc"] for d in error["details"]] == [["jobs", 1, "priority"]]
    assert await count_jobs(api) == 0


async def test_a_batch_makes_the_same_jobs_over_http_and_over_sql(api: Client, conn: Any) -> None:
    defaults = {"owner_service": "s", "task_type": "t", "model_profile": "m", "priority": 3, "input": {"d": 1}}
    jobs = [
        {"owner_ref": "a"},
        {"owner_ref": "b", "priority": None, "input": None, "max_attempts": None},
        {"owner_ref": "c", "priority": -4, "input": {"own": True}, "model_profile": "other", "max_attempts": 7},
    ]
    fields = ("owner_service", "owner_ref", "task_type", "model_profile", "input", "priority", "max_attempts")
    over_http = (await ok(await api.post(f"{API}/jobs/batch", json={"defaults": defaults, "jobs": jobs}), 201))["jobs"]
    over_sql = await conn.fetch("SELECT (r.job).* FROM aiservice.create_jobs($1, $2) r", jobs, defaults)
    assert [tuple(j[f] for f in fields) for j in over_http] == [tuple(r[f] for f in fields) for r in over_sql]
    assert [j["priority"] for j in over_http] == [3, 3, -4]


# --- retry and cancel by filter -----------------------------------------------------


async def test_retry_by_filter_resets_failed_and_running_jobs(api: Client) -> None:
    fail_x = await failed(api, owner_service="x")
    run_x = await running(api, owner_service="x")
    done_x = await completed(api, owner_service="x")
    pending_x = await create(api, owner_service="x")
    fail_y = await failed(api, owner_service="y")

    reply = await ok(await api.post(f"{API}/jobs/retry", json={"owner_service": "x"}))
    assert reply == {"count": 2, "ids": sorted([fail_x["id"], run_x["id"]])}
    for job_id in reply["ids"]:
        job = await get(api, job_id)
        assert job["status"] == "pending"
        assert job["attempts"] == 0
        assert job["error_category"] is job["error_message"] is job["worker_id"] is job["lease_token"] is None
    assert (await get(api, done_x["id"]))["status"] == "completed"
    assert (await get(api, pending_x["id"]))["status"] == "pending"
    assert (await get(api, fail_y["id"]))["status"] == "failed"

    # Nothing left to retry for x; by id for y.
    assert await ok(await api.post(f"{API}/jobs/retry", json={"owner_service": "x"})) == {"count": 0, "ids": []}
    reply = await ok(await api.post(f"{API}/jobs/retry", json={"ids": [fail_y["id"], done_x["id"]]}))
    assert reply == {"count": 1, "ids": [fail_y["id"]]}


async def test_retry_by_status_and_all(api: Client) -> None:
    fail = await failed(api)
    run = await running(api)
    reply = await ok(await api.post(f"{API}/jobs/retry", json={"status": ["failed"]}))
    assert reply == {"count": 1, "ids": [fail["id"]]}
    await refused(await api.post(f"{API}/jobs/retry", json={"status": ["completed"]}), 422, "invalid_argument")

    again = await failed(api)
    reply = await ok(await api.post(f"{API}/jobs/retry", json={"all": True}))
    assert reply == {"count": 2, "ids": sorted([run["id"], again["id"]])}


async def test_an_empty_filter_is_refused_unless_all(api: Client) -> None:
    pending = await create(api)
    fail = await failed(api)
    for action in ("retry", "cancel"):
        for body in ({}, {"all": False}, {"status": []}, {"status": None}, {"owner_service": None, "ids": None}):
            response = await api.post(f"{API}/jobs/{action}", json=body)
            error = await refused(response, 422, "invalid_argument")
            # In the words of an HTTP caller, not of the SQL function (p_all => true).
            assert error["message"] == f'refusing to {action} every job: give a filter or ids, or "all": true', body
    assert (await get(api, pending["id"]))["status"] == "pending"
    assert (await get(api, fail["id"]))["status"] == "failed"


async def test_cancel_by_filter_cancels_pending_and_running_jobs(api: Client) -> None:
    pending = await create(api, model_profile="whisperx")
    run = await running(api, model_profile="whisperx")
    done = await completed(api, model_profile="whisperx")
    other = await create(api, model_profile="vision")

    reply = await ok(await api.post(f"{API}/jobs/cancel", json={"model_profile": "whisperx"}))
    assert reply == {"count": 2, "ids": sorted([pending["id"], run["id"]])}
    for job_id in reply["ids"]:
        job = await get(api, job_id)
        assert job["status"] == "cancelled"
        assert job["finished_at"] is not None
        assert job["lease_token"] is None
    assert (await get(api, done["id"]))["status"] == "completed"
    assert (await get(api, other["id"]))["status"] == "pending"

    # The worker of the cancelled running job can no longer store a result.
    body = {"worker_id": run["worker_id"], "result": {"late": True}}
    await refused(await api.post(f"{API}/jobs/{run['id']}/complete", json=body), 409, "lease_lost")

    await refused(await api.post(f"{API}/jobs/cancel", json={"status": ["failed"]}), 422, "invalid_argument")
    reply = await ok(await api.post(f"{API}/jobs/cancel", json={"all": True}))
    assert reply == {"count": 1, "ids": [other["id"]]}


async def test_cancel_by_filter_with_status_and_created_window(api: Client) -> None:
    pending = await create(api)
    run = await running(api)
    reply = await ok(await api.post(f"{API}/jobs/cancel", json={"status": ["pending"]}))
    assert reply == {"count": 1, "ids": [pending["id"]]}
    window = {"created_after": "2000-01-01T00:00:00Z", "created_before": "2001-01-01T00:00:00Z"}
    assert await ok(await api.post(f"{API}/jobs/cancel", json=window)) == {"count": 0, "ids": []}
    assert (await get(api, run["id"]))["status"] == "running"


# --- claim ----------------------------------------------------------------------


async def test_claim_takes_highest_priority_then_oldest_and_sets_the_lease(api: Client) -> None:
    low = await create(api, priority=0)
    high = await create(api, priority=10)
    mid_old = await create(api, priority=5)
    mid_new = await create(api, priority=5)
    await create(api, priority=100, run_at="2999-01-01T00:00:00Z")  # not due

    jobs = await claim(api, "gpu-1", limit=2, lease_timeout=60)
    assert {j["id"] for j in jobs} == {high["id"], mid_old["id"]}
    for job in jobs:
        assert set(job) == JOB_COLUMNS | {"dependencies"} and job["dependencies"] is None
        assert job["status"] == "running"
        assert job["worker_id"] == "gpu-1"
        assert job["attempts"] == 1
        assert uuid.UUID(job["lease_token"])
        assert ts(job["lease_expires_at"]) - ts(job["started_at"]) == timedelta(seconds=60)
    assert len({j["lease_token"] for j in jobs}) == 2

    rest = await claim(api, "gpu-2", limit=10)
    assert [j["id"] for j in rest] in ([mid_new["id"], low["id"]], [low["id"], mid_new["id"]])
    assert {j["id"] for j in rest} == {mid_new["id"], low["id"]}
    assert await claim(api, "gpu-3", limit=10) == []


async def test_claim_default_limit_and_lease(api: Client, settings: Settings) -> None:
    await create(api)
    await create(api)
    (job,) = await claim(api, "w")
    assert ts(job["lease_expires_at"]) - ts(job["started_at"]) == settings.worker_lease_timeout


async def test_claim_filters_by_task_type_and_model_profile(api: Client) -> None:
    chat = await create(api, task_type="llm_chat", model_profile="qwen")
    speech = await create(api, task_type="transcribe", model_profile="whisperx")
    vision = await create(api, task_type="llm_chat", model_profile="vision")

    assert await claim(api, task_types=["summarize"], limit=10) == []
    assert [j["id"] for j in await claim(api, task_types=["transcribe"], limit=10)] == [speech["id"]]
    got = await claim(api, task_types=["llm_chat", "x"], model_profiles=["vision"], limit=10)
    assert [j["id"] for j in got] == [vision["id"]]
    assert [j["id"] for j in await claim(api, model_profiles=["qwen", "vision"], limit=10)] == [chat["id"]]


# --- one job ---------------------------------------------------------------------


async def test_get_unknown_job_is_404(api: Client) -> None:
    error = await refused(await api.get(f"{API}/jobs/987654321"), 404, "not_found")
    assert "987654321" in error["message"]


async def test_complete_stores_the_result(api: Client) -> None:
    job = await running(api, "gpu-1")
    body = {"worker_id": "gpu-1", "result": {"content": "ok", "usage": {"total_tokens": 3}}}
    done = await ok(await api.post(f"{API}/jobs/{job['id']}/complete", json=body))
    assert set(done) == JOB_COLUMNS
    assert done["status"] == "completed"
    assert done["result"] == body["result"]
    assert done["worker_id"] == "gpu-1"
    assert done["lease_token"] is None
    assert done["lease_expires_at"] is None
    assert done["finished_at"] is not None
    assert await get(api, job["id"]) == done

    # Once completed it stays completed.
    await refused(await api.post(f"{API}/jobs/{job['id']}/complete", json=body), 409, "lease_lost")
    await refused(await api.post(f"{API}/jobs/{job['id']}/retry", headers=JSON_HEADERS), 409, "invalid_state")
    await refused(await api.post(f"{API}/jobs/{job['id']}/cancel", headers=JSON_HEADERS), 409, "invalid_state")
    assert await get(api, job["id"]) == done


async def test_complete_with_the_lease_token(api: Client) -> None:
    job = await running(api, "gpu-1")
    wrong = {"worker_id": "gpu-1", "result": {}, "lease_token": str(uuid.uuid4())}
    await refused(await api.post(f"{API}/jobs/{job['id']}/complete", json=wrong), 409, "lease_lost")
    right = {"worker_id": "gpu-1", "result": {"a": 1}, "lease_token": job["lease_token"]}
    assert (await ok(await api.post(f"{API}/jobs/{job['id']}/complete", json=right)))["status"] == "completed"


async def test_complete_refused_for_wrong_state_other_worker_and_unknown_job(api: Client) -> None:
    pending = await create(api)
    body = {"worker_id": "gpu-1", "result": {"content": "x"}}
    await refused(await api.post(f"{API}/jobs/{pending['id']}/complete", json=body), 409, "lease_lost")
    assert await get(api, pending["id"]) == pending

    job = await running(api, "gpu-1")
    await refused(
        await api.post(f"{API}/jobs/{job['id']}/complete", json=body | {"worker_id": "gpu-2"}), 409, "lease_lost"
    )
    assert (await get(api, job["id"]))["status"] == "running"

    await refused(await api.post(f"{API}/jobs/987654321/complete", json=body), 404, "not_found")


async def test_a_stale_worker_cannot_overwrite_after_the_job_was_claimed_again(api: Client, store: JobStore) -> None:
    job = await running(api, "old-worker", max_attempts=3)
    # The old worker stalls past its lease (moved into the past rather than waited for).
    await store.pool.execute(
        "UPDATE aiservice.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1", job["id"]
    )
    (again,) = await claim(api, "new-worker", task_types=[job["task_type"]])
    assert again["id"] == job["id"]
    assert again["attempts"] == 2
    assert again["lease_token"] != job["lease_token"]

    jid = job["id"]
    stale = {"worker_id": "old-worker", "lease_token": job["lease_token"]}
    await refused(
        await api.post(f"{API}/jobs/{jid}/complete", json=stale | {"result": {"v": "old"}}), 409, "lease_lost"
    )
    await refused(
        await api.post(f"{API}/jobs/{jid}/fail", json=stale | {"error_category": "timeout"}), 409, "lease_lost"
    )
    await refused(await api.post(f"{API}/jobs/{jid}/heartbeat", json=stale), 409, "lease_lost")

    fresh = {"worker_id": "new-worker", "lease_token": again["lease_token"], "result": {"v": "new"}}
    assert (await ok(await api.post(f"{API}/jobs/{jid}/complete", json=fresh)))["result"] == {"v": "new"}
    await refused(
        await api.post(f"{API}/jobs/{jid}/complete", json=stale | {"result": {"v": "old"}}), 409, "lease_lost"
    )
    assert (await get(api, jid))["result"] == {"v": "new"}


async def test_the_same_worker_id_with_an_old_lease_token_is_fenced(api: Client, store: JobStore) -> None:
    first = await running(api, "gpu-1")
    await store.pool.execute(
        "UPDATE aiservice.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1", first["id"]
    )
    (second,) = await claim(api, "gpu-1", task_types=[first["task_type"]])
    assert second["lease_token"] != first["lease_token"]
    old = {"worker_id": "gpu-1", "lease_token": first["lease_token"], "result": {"v": 1}}
    await refused(await api.post(f"{API}/jobs/{first['id']}/complete", json=old), 409, "lease_lost")
    new = old | {"lease_token": second["lease_token"], "result": {"v": 2}}
    assert (await ok(await api.post(f"{API}/jobs/{first['id']}/complete", json=new)))["result"] == {"v": 2}


async def test_a_worker_whose_job_was_retried_and_reclaimed_is_fenced(api: Client) -> None:
    job = await running(api, "gpu-1")
    retried = await ok(await api.post(f"{API}/jobs/{job['id']}/retry", headers=JSON_HEADERS))
    assert retried["status"] == "pending"
    (again,) = await claim(api, "gpu-2", task_types=[job["task_type"]])
    body = {"worker_id": "gpu-1", "result": {"v": "old"}}
    await refused(await api.post(f"{API}/jobs/{job['id']}/complete", json=body), 409, "lease_lost")
    assert (await get(api, job["id"]))["worker_id"] == again["worker_id"] == "gpu-2"


# --- fail -----------------------------------------------------------------------


async def test_fail_retryable_goes_back_to_pending_with_backoff(api: Client) -> None:
    job = await running(api, "gpu-1")
    body = {"worker_id": "gpu-1", "error_category": "timeout", "error_message": "provider took too long"}
    back = await ok(await api.post(f"{API}/jobs/{job['id']}/fail", json=body))
    assert back["status"] == "pending"
    assert back["attempts"] == 1
    assert back["error_category"] == "timeout"
    assert back["error_message"] == "provider took too long"
    assert back["worker_id"] is back["lease_token"] is back["lease_expires_at"] is back["finished_at"] is None
    # First retry: 10 s with +/-25 % jitter, counted from the moment of the failure.
    delay = ts(back["run_at"]) - ts(back["updated_at"])
    assert timedelta(seconds=7.5) <= delay <= timedelta(seconds=12.5)
    # Not claimable before its backoff is over.
    assert await claim(api, task_types=[job["task_type"]]) == []


async def test_fail_retry_after_sets_run_at(api: Client) -> None:
    job = await running(api, "gpu-1")
    body = {"worker_id": "gpu-1", "error_category": "rate_limited", "retry_after": 120}
    back = await ok(await api.post(f"{API}/jobs/{job['id']}/fail", json=body))
    assert back["status"] == "pending"
    assert ts(back["run_at"]) - ts(back["updated_at"]) == timedelta(seconds=120)
    # rate_limited with a retry_after cooled the whole profile down; end it early.
    await ok(await api.put(f"{API}/limits/model_profile/{job['model_profile']}", json={"cooldown_until": None}))

    job = await running(api, "gpu-1")
    body = {"worker_id": "gpu-1", "error_category": "bad_output", "retryable": True, "retry_after": 0}
    back = await ok(await api.post(f"{API}/jobs/{job['id']}/fail", json=body))
    assert back["status"] == "pending"
    assert back["run_at"] == back["updated_at"]
    (again,) = await claim(api, task_types=[job["task_type"]])
    assert again["attempts"] == 2


async def test_fail_not_retryable_is_terminal(api: Client) -> None:
    for category, retryable in (("timeout", False), ("invalid_input", None), ("bad_output", False)):
        job = await running(api, "gpu-1")
        body = {"worker_id": "gpu-1", "error_category": category, "error_message": "no", "retryable": retryable}
        done = await ok(await api.post(f"{API}/jobs/{job['id']}/fail", json=body))
        assert done["status"] == "failed", category
        assert done["error_category"] == category
        assert done["error_message"] == "no"
        assert done["finished_at"] is not None
        assert done["worker_id"] == "gpu-1"
        assert done["lease_token"] is None
        assert await get(api, job["id"]) == done


async def test_fail_on_the_last_attempt_is_terminal_even_when_retryable(api: Client) -> None:
    job = await running(api, "gpu-1", max_attempts=1)
    body = {"worker_id": "gpu-1", "error_category": "timeout", "retryable": True, "retry_after": 1}
    done = await ok(await api.post(f"{API}/jobs/{job['id']}/fail", json=body))
    assert done["status"] == "failed"
    assert done["attempts"] == 1


async def test_fail_refused_for_wrong_state_other_worker_and_unknown_job(api: Client) -> None:
    pending = await create(api)
    body = {"worker_id": "gpu-1", "error_category": "timeout"}
    await refused(await api.post(f"{API}/jobs/{pending['id']}/fail", json=body), 409, "lease_lost")
    job = await running(api, "gpu-1")
    await refused(await api.post(f"{API}/jobs/{job['id']}/fail", json=body | {"worker_id": "gpu-2"}), 409, "lease_lost")
    await refused(await api.post(f"{API}/jobs/987654321/fail", json=body), 404, "not_found")


# --- heartbeat --------------------------------------------------------------------


async def test_heartbeat_extends_the_lease(api: Client, settings: Settings) -> None:
    job = await running(api, "gpu-1")
    lease = await ok(
        await api.post(f"{API}/jobs/{job['id']}/heartbeat", json={"worker_id": "gpu-1", "lease_timeout": 3600})
    )
    assert set(lease) == {"id", "lease_expires_at"}
    assert lease["id"] == job["id"]
    now = await get(api, job["id"])
    assert ts(now["lease_expires_at"]) == ts(lease["lease_expires_at"])
    assert ts(lease["lease_expires_at"]) - ts(now["updated_at"]) == timedelta(hours=1)
    assert now["status"] == "running"
    assert now["lease_token"] == job["lease_token"]

    body = {"worker_id": "gpu-1", "lease_token": job["lease_token"]}
    lease = await ok(await api.post(f"{API}/jobs/{job['id']}/heartbeat", json=body))
    now = await get(api, job["id"])
    assert ts(lease["lease_expires_at"]) - ts(now["updated_at"]) == settings.worker_lease_timeout


async def test_heartbeat_refused_for_wrong_worker_token_state_and_unknown_job(api: Client) -> None:
    job = await running(api, "gpu-1")
    jid = job["id"]
    await refused(await api.post(f"{API}/jobs/{jid}/heartbeat", json={"worker_id": "gpu-2"}), 409, "lease_lost")
    wrong = {"worker_id": "gpu-1", "lease_token": str(uuid.uuid4())}
    await refused(await api.post(f"{API}/jobs/{jid}/heartbeat", json=wrong), 409, "lease_lost")
    pending = await create(api)
    await refused(
        await api.post(f"{API}/jobs/{pending['id']}/heartbeat", json={"worker_id": "gpu-1"}), 409, "lease_lost"
    )
    await refused(await api.post(f"{API}/jobs/987654321/heartbeat", json={"worker_id": "gpu-1"}), 404, "not_found")


# --- retry and cancel one job --------------------------------------------------------


async def test_retry_one_failed_or_running_job(api: Client) -> None:
    fail = await failed(api)
    back = await ok(await api.post(f"{API}/jobs/{fail['id']}/retry", headers=JSON_HEADERS))
    assert back["id"] == fail["id"]
    assert back["status"] == "pending"
    assert back["attempts"] == 0
    assert back["error_category"] is back["error_message"] is back["finished_at"] is back["worker_id"] is None
    assert await get(api, fail["id"]) == back

    run = await running(api)
    back = await ok(await api.post(f"{API}/jobs/{run['id']}/retry", headers=JSON_HEADERS))
    assert back["status"] == "pending"
    assert back["lease_token"] is None


async def test_retry_one_refused_for_pending_completed_cancelled_and_unknown(api: Client) -> None:
    pending = await create(api)
    done = await completed(api)
    cancelled = await create(api)
    await ok(await api.post(f"{API}/jobs/{cancelled['id']}/cancel", headers=JSON_HEADERS))
    for job in (pending, done, cancelled):
        error = await refused(
            await api.post(f"{API}/jobs/{job['id']}/retry", headers=JSON_HEADERS), 409, "invalid_state"
        )
        assert str(job["id"]) in error["message"]
    assert (await get(api, done["id"]))["status"] == "completed"
    await refused(await api.post(f"{API}/jobs/987654321/retry", headers=JSON_HEADERS), 404, "not_found")


async def test_cancel_one_pending_or_running_job(api: Client) -> None:
    pending = await create(api)
    gone = await ok(await api.post(f"{API}/jobs/{pending['id']}/cancel", headers=JSON_HEADERS))
    assert gone["status"] == "cancelled"
    assert gone["finished_at"] is not None
    assert await get(api, pending["id"]) == gone
    # A cancelled job is never claimed.
    assert await claim(api, task_types=[pending["task_type"]], limit=10) == []

    run = await running(api, "gpu-1")
    gone = await ok(await api.post(f"{API}/jobs/{run['id']}/cancel", headers=JSON_HEADERS))
    assert gone["status"] == "cancelled"
    assert gone["lease_token"] is None
    body = {"worker_id": "gpu-1", "error_category": "timeout"}
    await refused(await api.post(f"{API}/jobs/{run['id']}/fail", json=body), 409, "lease_lost")


async def test_cancel_one_refused_for_finished_jobs_and_unknown(api: Client) -> None:
    done = await completed(api)
    fail = await failed(api)
    cancelled = await create(api)
    await ok(await api.post(f"{API}/jobs/{cancelled['id']}/cancel", headers=JSON_HEADERS))
    for job in (done, fail, cancelled):
        await refused(await api.post(f"{API}/jobs/{job['id']}/cancel", headers=JSON_HEADERS), 409, "invalid_state")
    assert (await get(api, done["id"]))["status"] == "completed"
    assert (await get(api, fail["id"]))["status"] == "failed"
    await refused(await api.post(f"{API}/jobs/987654321/cancel", headers=JSON_HEADERS), 404, "not_found")


# --- stats and probes ------------------------------------------------------------------


async def test_stats_on_an_empty_queue(api: Client) -> None:
    stats = await ok(await api.get(f"{API}/stats"))
    assert stats == {
        "window_seconds": 3600,
        "totals": {"pending": 0, "running": 0, "completed": 0, "failed": 0, "cancelled": 0},
        "by_status": [],
        "created": [],
        "errors": [],
        "errors_last_hour": [],
        "oldest_pending_age_seconds": None,
        "oldest_pending": [],
        "completed_per_minute": {"last_5m": 0, "last_60m": 0},
        "latency": [],
        "running_by_worker": [],
        "limits": [],
        "per_minute": [],
    }


async def test_stats_counts_by_status_task_type_model_profile_and_error(api: Client) -> None:
    await create(api, task_type="llm_chat", model_profile="qwen", run_at="2020-01-01T00:00:00Z")
    await create(api, task_type="llm_chat", model_profile="qwen")
    await create(api, task_type="transcribe", model_profile="whisperx")
    await create(api, task_type="llm_chat", model_profile="qwen", run_at="2999-01-01T00:00:00Z")
    await failed(api, category="bad_output", model_profile="qwen")
    await failed(api, category="bad_output", model_profile="qwen")
    await failed(api, category="invalid_input", model_profile="qwen")

    stats = await ok(await api.get(f"{API}/stats"))
    assert {"by_status", "errors", "oldest_pending_age_seconds"} <= set(stats)
    by_status = {(r["status"], r["task_type"], r["model_profile"]): r["count"] for r in stats["by_status"]}
    assert by_status[("pending", "llm_chat", "qwen")] == 3
    assert by_status[("pending", "transcribe", "whisperx")] == 1
    assert sum(n for (status, _, _), n in by_status.items() if status == "failed") == 3
    assert sum(by_status.values()) == 7
    errors = {r["error_category"]: r["count"] for r in stats["errors"]}
    assert errors == {"bad_output": 2, "invalid_input": 1}
    # The oldest due pending job has waited since 2020 (jobs due in the future are not waiting).
    age = stats["oldest_pending_age_seconds"]
    assert age >= (datetime(2025, 1, 1, tzinfo=UTC) - datetime(2020, 1, 1, tzinfo=UTC)).total_seconds()


async def test_healthz_and_readyz(api: Client) -> None:
    assert await ok(await api.get("/healthz")) == {"status": "ok"}
    assert await ok(await api.get("/readyz")) == {"status": "ready"}


@pytest.fixture
async def doomed_database(pg_server: str, template_db: str) -> AsyncIterator[tuple[str, str]]:
    """A migrated database the test may drop: (server DSN, database name)."""
    name = f"aiservice_h_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
        yield pg_server, name
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def _dsn(server: str, database: str) -> str:
    parts = urlsplit(server)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


async def start(settings: Settings, store: JobStore) -> Client:
    client: Client = TestClient(TestServer(create_app(settings, store=store)))
    await client.start_server()
    return client


async def test_readyz_is_503_when_the_database_was_dropped(
    doomed_database: tuple[str, str], settings: Settings
) -> None:
    server, name = doomed_database
    pool = await create_pool(_dsn(server, name), max_size=2, wait=5)
    client = await start(settings, JobStore(pool))
    try:
        assert await ok(await client.get("/readyz")) == {"status": "ready"}
        await create(client)

        admin = await asyncpg.connect(server)
        try:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            await admin.close()

        for _ in range(2):  # the first call finds the dead connection, the second a fresh one refused
            assert await ok(await client.get("/readyz"), 503) == {"status": "database unavailable"}
            await refused(await client.get(f"{API}/jobs"), 503, "database_unavailable")
            await refused(await client.post(f"{API}/jobs", json=job_spec()), 503, "database_unavailable")
        assert await ok(await client.get("/healthz")) == {"status": "ok"}
    finally:
        await client.close()
        await pool.close()


async def test_readyz_is_503_when_the_pool_is_closed(database_url: str, settings: Settings) -> None:
    pool = await create_pool(database_url, max_size=2, wait=5)
    client = await start(settings, JobStore(pool))
    try:
        assert (await client.get("/readyz")).status == 200
        await pool.close()
        assert await ok(await client.get("/readyz"), 503) == {"status": "database unavailable"}
        await refused(await client.get(f"{API}/stats"), 503, "database_unavailable")
        await refused(await client.post(f"{API}/jobs/claim", json={"worker_id": "w"}), 503, "database_unavailable")
        assert await ok(await client.get("/healthz")) == {"status": "ok"}
    finally:
        await client.close()
