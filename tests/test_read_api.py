"""The read routes the operator console uses: batches listed newest first, jobs by error category,
a job's dependencies and dependents, webhook deliveries that keep retrying, over HTTP. What list_jobs and
list_batches read: tests/sql/test_read.py and tests/sql/test_delivery.py."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, TypeAlias

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from conftest import ClientFactory, JobFactory

from aiservice.client import AsyncClient, Invalid, NotFound
from aiservice.db.store import JobStore
from aiservice.jobs import JobCreate
from aiservice.webhooks import new_secret

Conn: TypeAlias = "asyncpg.Connection[Any]"
Client = TestClient[Any, Any]
LEASE = timedelta(minutes=5)


def base_url(api: Client) -> str:
    return str(api.server.make_url("")).rstrip("/")


async def batch(store: JobStore, owner: str, n: int = 1) -> int:
    spec = {"owner_service": owner, "task_type": "llm_chat", "model_profile": "m"}
    created = await store.create_jobs([JobCreate.model_validate(spec | {"owner_ref": f"r/{i}"}) for i in range(n)])
    batch_id = created[0][0].batch_id
    assert batch_id is not None
    return batch_id


# Batches


async def test_batches_over_http_and_the_client(api_factory: ClientFactory, store: JobStore) -> None:
    ids = [await batch(store, owner) for owner in ["tel", "mon", "tel", "tel"]]
    api = await api_factory()
    first = await (await api.get("/api/v1/batches", params={"owner_service": "tel", "limit": "2"})).json()
    assert [b["id"] for b in first["batches"]] == [ids[3], ids[2]]
    assert first["batches"][0] == await (await api.get(f"/api/v1/batches/{ids[3]}")).json()
    assert first["next_cursor"] == str(ids[2])
    second = await (await api.get(f"/api/v1/batches?owner_service=tel&limit=2&cursor={first['next_cursor']}")).json()
    assert ([b["id"] for b in second["batches"]], second["next_cursor"]) == ([ids[0]], None)
    every = await (await api.get("/api/v1/batches")).json()
    assert [b["id"] for b in every["batches"]] == ids[::-1]
    for bad in ["limit=0", "limit=501", "cursor=x", "owner_service=", "other=1"]:
        response = await api.get(f"/api/v1/batches?{bad}")
        assert response.status == 422, bad

    async with AsyncClient(base_url(api)) as client:
        page = await client.list_batches(owner_service="mon")
        assert ([b.id for b in page.batches], page.next_cursor) == ([ids[1]], None)
        page = await client.list_batches(limit=3)
        assert [b.id for b in page.batches] == ids[:0:-1] and page.next_cursor == str(ids[1])
        with pytest.raises(Invalid):
            await client.list_batches(limit=0)


# Jobs by error category


async def failed(store: JobStore, job_factory: JobFactory, category: str, **spec: Any) -> int:
    job = await job_factory(task_type=f"t_{category}", **spec)
    (claimed,) = await store.claim_jobs("w", 1, lease_timeout=LEASE, task_types=[job.task_type])
    await store.fail_job(claimed.id, "w", category, f"it was {category}", retryable=False)
    return job.id


async def test_list_jobs_by_error_category(conn: Conn, api: Client, store: JobStore, job_factory: JobFactory) -> None:
    timeouts = [await failed(store, job_factory, "timeout") for _ in range(2)]
    invalid = await failed(store, job_factory, "invalid_input")
    await job_factory()  # no error at all
    by = "SELECT id FROM aiservice.list_jobs(p_error_category => $1)"
    assert [r[0] for r in await conn.fetch(by, "timeout")] == timeouts[::-1]
    # Callers of the earlier argument list are unaffected: positional and named calls still work.
    assert (
        len(
            await conn.fetch(
                "SELECT * FROM aiservice.list_jobs(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 50, NULL)"
            )
        )
        == 4
    )
    assert len(await conn.fetch("SELECT * FROM aiservice.list_jobs(p_limit => 2)")) == 2

    page = await (await api.get("/api/v1/jobs", params={"error_category": "invalid_input"})).json()
    assert [j["id"] for j in page["jobs"]] == [invalid]
    page = await (await api.get("/api/v1/jobs?error_category=timeout&status=failed&limit=1")).json()
    assert [j["id"] for j in page["jobs"]] == [timeouts[1]] and page["next_cursor"] == str(timeouts[1])
    assert (await api.get("/api/v1/jobs?error_category=Not-A-Category")).status == 422

    async with AsyncClient(base_url(api)) as client:
        assert [j.id for j in (await client.list_jobs(error_category="timeout")).jobs] == timeouts[::-1]


# Dependencies and dependents


async def test_dependencies_and_dependents_of_a_job(conn: Conn, api: Client, job_factory: JobFactory) -> None:
    a = await job_factory(task_type="transcribe")
    b = await job_factory(task_type="transcribe")
    c = await job_factory(task_type="call_analysis", depends_on=[b.id, a.id])
    d = await job_factory(task_type="summary", depends_on=[a.id])

    got = await conn.fetchval("SELECT aiservice.list_dependencies($1)", c.id)
    assert [x["id"] for x in got["depends_on"]] == [b.id, a.id]  # in the order given
    assert got["depends_on"][0] == {
        "id": b.id,
        "task_type": "transcribe",
        "model_profile": "qwen2.5-14b",
        "status": "pending",
    }
    assert got["dependents"] == []

    page = await (await api.get(f"/api/v1/jobs/{a.id}/dependencies")).json()
    assert (page["id"], page["depends_on"], page["next_cursor"]) == (a.id, [], None)
    assert [x["id"] for x in page["dependents"]] == [c.id, d.id]
    page = await (await api.get(f"/api/v1/jobs/{a.id}/dependencies?limit=1")).json()
    assert ([x["id"] for x in page["dependents"]], page["next_cursor"]) == ([c.id], str(c.id))
    page = await (await api.get(f"/api/v1/jobs/{a.id}/dependencies?limit=1&cursor={c.id}")).json()
    assert [x["id"] for x in page["dependents"]] == [d.id]
    assert (await api.get("/api/v1/jobs/987654/dependencies")).status == 404
    assert (await api.get(f"/api/v1/jobs/{a.id}/dependencies?limit=0")).status == 422

    async with AsyncClient(base_url(api)) as client:
        links = await client.list_dependencies(c.id)
        assert [x.id for x in links.depends_on] == [b.id, a.id]
        with pytest.raises(NotFound):
            await client.list_dependencies(987654)


# Deliveries that keep retrying


async def test_retrying_deliveries_are_listed_apart(conn: Conn, store: JobStore, api_factory: ClientFactory) -> None:
    await store.set_webhook("tel", "http://127.0.0.1:9/hook", new_secret(), events=["job.finished"], rotate=False)
    for n in range(3):
        job = await store.create_job(
            JobCreate(owner_service="tel", owner_ref=f"r/{n}", task_type="t", model_profile="m")
        )
        await store.cancel_job(job[0].id)
    first, second = sorted(await store.claim_deliveries(2, LEASE), key=lambda d: d["id"])  # the third stays untried
    assert await store.record_delivery(first["id"], None, "connection refused", timedelta(hours=24)) == "pending"
    assert await store.record_delivery(second["id"], 500, "no", timedelta(0)) == "failed"
    # One never tried (attempts 0), one tried and still pending, one failed for good.
    retrying = await store.list_deliveries("tel", status="retrying", before_id=None, limit=10)
    assert [(d.id, d.status, d.attempts, d.last_error) for d in retrying] == [
        (first["id"], "pending", 1, "connection refused")
    ]
    assert len(await store.list_deliveries("tel", status="pending", before_id=None, limit=10)) == 2
    assert [r[0] for r in await conn.fetch("SELECT id FROM aiservice.list_deliveries('tel', 'retrying')")] == [
        first["id"]
    ]

    api = await api_factory()
    page = await (await api.get("/api/v1/webhooks/tel/deliveries?status=retrying")).json()
    assert first["id"] in [d["id"] for d in page["deliveries"]]
    assert second["id"] not in [d["id"] for d in page["deliveries"]]
    assert (await api.get("/api/v1/webhooks/tel/deliveries?status=sending")).status == 422
