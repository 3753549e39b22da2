"""POST /api/v1/jobs/complete: a worker's results for many jobs in one request and one transaction,
each fenced on its own; and the typed client's complete_jobs."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient
from conftest import JSON_HEADERS, ClientFactory, job_spec

from aiservice.client import AsyncClient

API = "/api/v1"


async def claimed(api: TestClient[Any, Any], n: int) -> list[dict[str, Any]]:
    for i in range(n):
        resp = await api.post(f"{API}/jobs", json=job_spec(owner_ref=f"call/{i}"), headers=JSON_HEADERS)
        assert resp.status == 201
    resp = await api.post(f"{API}/jobs/claim", json={"worker_id": "gpu-1", "limit": n}, headers=JSON_HEADERS)
    jobs: list[dict[str, Any]] = (await resp.json())["jobs"]
    assert len(jobs) == n
    return jobs


async def test_many_results_in_one_request_each_fenced(api: TestClient[Any, Any]) -> None:
    first, second, third = await claimed(api, 3)
    body = {
        "worker_id": "gpu-1",
        "jobs": [
            {"id": third["id"], "result": {"text": "c"}, "lease_token": third["lease_token"]},
            {"id": first["id"], "result": {"text": "a"}},
            {"id": second["id"], "result": {"text": "b"}, "lease_token": "00000000-0000-0000-0000-000000000000"},
            {"id": 987654321, "result": {}},
        ],
    }
    resp = await api.post(f"{API}/jobs/complete", json=body, headers=JSON_HEADERS)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["jobs"] == [
        {"id": third["id"], "outcome": "completed"},
        {"id": first["id"], "outcome": "completed"},
        {"id": second["id"], "outcome": "lease_lost"},  # another lease: left running
        {"id": 987654321, "outcome": "not_found"},
    ]
    got = await (await api.get(f"{API}/jobs/{first['id']}")).json()
    assert (got["status"], got["result"]) == ("completed", {"text": "a"})
    assert (await (await api.get(f"{API}/jobs/{second['id']}")).json())["status"] == "running"
    # Sent again: finished already, so the lease is lost, not the job.
    again = await api.post(f"{API}/jobs/complete", json={"worker_id": "gpu-1", "jobs": body["jobs"][1:2]},
                           headers=JSON_HEADERS)  # fmt: skip
    assert (await again.json())["jobs"] == [{"id": first["id"], "outcome": "lease_lost"}]


async def test_bad_requests_are_refused_with_a_reason(api: TestClient[Any, Any]) -> None:
    bad = [
        {"worker_id": "w", "jobs": []},
        {"worker_id": "w", "jobs": [{"id": 1, "result": {}}, {"id": 1, "result": {}}]},
        {"worker_id": "w", "jobs": [{"id": 1, "result": "text"}]},
        {"worker_id": "w", "jobs": [{"id": i, "result": {}} for i in range(1, 1002)]},
        {"jobs": [{"id": 1, "result": {}}]},
    ]
    for body in bad:
        resp = await api.post(f"{API}/jobs/complete", json=body, headers=JSON_HEADERS)
        assert resp.status == 422, (body, resp.status)
        assert (await resp.json())["error"]


async def test_the_client_completes_many(api_factory: ClientFactory) -> None:
    api = await api_factory()
    jobs = await claimed(api, 2)
    async with AsyncClient(str(api.server.make_url("")).rstrip("/")) as client:
        outcomes = await client.complete_jobs(
            "gpu-1", [(j["id"], {"n": i}, j["lease_token"]) for i, j in enumerate(jobs)] + [(424242, {}, None)]
        )
    assert outcomes == {jobs[0]["id"]: "completed", jobs[1]["id"]: "completed", 424242: "not_found"}
