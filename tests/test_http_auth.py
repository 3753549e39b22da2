"""Bearer-token auth on every /api/v1 route, enumerated from the app's router so none slips through."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import JSON_HEADERS

from aiservice.api.app import create_app
from aiservice.db.store import JobStore
from aiservice.jobs import Job, JobCreate
from aiservice.settings import Settings
from aiservice.webhooks import new_secret

Client = TestClient[Any, Any]
ClientFactory = Callable[..., Awaitable[Client]]
JobFactory = Callable[..., Awaitable[Job]]

TOKEN = "s3cret-token"
API = "/api/v1"
PUBLIC = ("/healthz", "/readyz")

_unique = itertools.count(1)

# (url, JSON body or None, the status a caller with the right token gets)
Call = tuple[str, dict[str, Any] | None, int]
Sample = Callable[["Jobs"], Awaitable[Call]]


class Jobs:
    """Puts jobs in the state each route needs, through the repository (not the API under test)."""

    def __init__(self, store: JobStore, job_factory: JobFactory) -> None:
        self.store = store
        self.job_factory = job_factory

    async def pending(self) -> Job:
        return await self.job_factory(task_type=f"auth_{next(_unique)}")

    async def running(self) -> Job:
        job = await self.pending()
        (claimed,) = await self.store.claim_jobs(
            "auth-worker", 1, lease_timeout=timedelta(minutes=5), task_types=[job.task_type]
        )
        return claimed

    async def status(self, job_id: int) -> str:
        return str((await self.store.get_job(job_id)).status)


def _job_body() -> dict[str, Any]:
    return {"owner_service": "telephony", "owner_ref": f"call/{next(_unique)}", "task_type": "t", "model_profile": "m"}


async def _create(jobs: Jobs) -> Call:
    return f"{API}/jobs", _job_body(), 201


async def _list(jobs: Jobs) -> Call:
    return f"{API}/jobs?status=pending&limit=5", None, 200


async def _batch(jobs: Jobs) -> Call:
    return f"{API}/jobs/batch", {"defaults": {"task_type": "t"}, "jobs": [_job_body()]}, 201


async def _retry_many(jobs: Jobs) -> Call:
    job = await jobs.running()
    return f"{API}/jobs/retry", {"ids": [job.id]}, 200


async def _cancel_many(jobs: Jobs) -> Call:
    job = await jobs.pending()
    return f"{API}/jobs/cancel", {"ids": [job.id]}, 200


async def _claim(jobs: Jobs) -> Call:
    return f"{API}/jobs/claim", {"worker_id": "w", "task_types": ["nothing"]}, 200


async def _get(jobs: Jobs) -> Call:
    return f"{API}/jobs/{(await jobs.pending()).id}", None, 200


async def _complete(jobs: Jobs) -> Call:
    job = await jobs.running()
    return f"{API}/jobs/{job.id}/complete", {"worker_id": job.worker_id, "result": {"ok": True}}, 200


async def _fail(jobs: Jobs) -> Call:
    job = await jobs.running()
    return f"{API}/jobs/{job.id}/fail", {"worker_id": job.worker_id, "error_category": "bad_output"}, 200


async def _heartbeat(jobs: Jobs) -> Call:
    job = await jobs.running()
    return f"{API}/jobs/{job.id}/heartbeat", {"worker_id": job.worker_id}, 200


async def _retry_one(jobs: Jobs) -> Call:
    return f"{API}/jobs/{(await jobs.running()).id}/retry", None, 200


async def _cancel_one(jobs: Jobs) -> Call:
    return f"{API}/jobs/{(await jobs.pending()).id}/cancel", None, 200


async def _stats(jobs: Jobs) -> Call:
    return f"{API}/stats", None, 200


async def _providers(jobs: Jobs) -> Call:
    return f"{API}/providers/status", None, 200


async def _infra(jobs: Jobs) -> Call:
    return f"{API}/infra/status", None, 200


async def _openapi(jobs: Jobs) -> Call:
    return f"{API}/openapi.json", None, 200


async def _list_limits(jobs: Jobs) -> Call:
    return f"{API}/limits", None, 200


async def _set_limit(jobs: Jobs) -> Call:
    return f"{API}/limits/task_type/auth_{next(_unique)}", {"max_running": 2}, 200


async def _delete_limit(jobs: Jobs) -> Call:
    name = f"auth_{next(_unique)}"
    await jobs.store.set_limit("task_type", name, {"paused": True})
    return f"{API}/limits/task_type/{name}", None, 204


async def _wait(jobs: Jobs) -> Call:
    return f"{API}/jobs/wait", {"ids": [(await jobs.pending()).id], "timeout": 0}, 200


async def _batch_id(jobs: Jobs) -> int:
    ((job, _),) = await jobs.store.create_jobs([JobCreate.model_validate(_job_body())])
    assert job.batch_id is not None
    return job.batch_id


async def _get_batch(jobs: Jobs) -> Call:
    return f"{API}/batches/{await _batch_id(jobs)}", None, 200


async def _list_batches(jobs: Jobs) -> Call:
    await _batch_id(jobs)
    return f"{API}/batches", None, 200


async def _dependencies(jobs: Jobs) -> Call:
    return f"{API}/jobs/{(await jobs.pending()).id}/dependencies", None, 200


async def _cancel_batch(jobs: Jobs) -> Call:
    return f"{API}/batches/{await _batch_id(jobs)}/cancel", None, 200


async def _list_webhooks(jobs: Jobs) -> Call:
    return f"{API}/webhooks", None, 200


async def _set_webhook(jobs: Jobs) -> Call:
    return f"{API}/webhooks/auth_{next(_unique)}", {"url": "http://127.0.0.1:9/hook"}, 200


async def _webhook(jobs: Jobs) -> str:
    owner = f"auth_{next(_unique)}"
    await jobs.store.set_webhook(owner, "http://127.0.0.1:9/hook", new_secret(), events=None, rotate=False)
    return owner


async def _delete_webhook(jobs: Jobs) -> Call:
    return f"{API}/webhooks/{await _webhook(jobs)}", None, 204


async def _list_deliveries(jobs: Jobs) -> Call:
    return f"{API}/webhooks/{await _webhook(jobs)}/deliveries", None, 200


async def _retry_delivery(jobs: Jobs) -> Call:
    owner = await _webhook(jobs)
    job = await jobs.job_factory(owner_service=owner)
    await jobs.store.cancel_job(job.id)
    (delivery,) = await jobs.store.list_deliveries(owner, status=None, before_id=None, limit=1)
    return f"{API}/webhooks/{owner}/deliveries/{delivery.id}/retry", None, 200


# Every /api/v1 route needs an entry: a route added without one fails test_samples_cover_every_api_route.
SAMPLES: dict[tuple[str, str], Sample] = {
    ("POST", f"{API}/jobs"): _create,
    ("GET", f"{API}/jobs"): _list,
    ("POST", f"{API}/jobs/batch"): _batch,
    ("POST", f"{API}/jobs/retry"): _retry_many,
    ("POST", f"{API}/jobs/cancel"): _cancel_many,
    ("POST", f"{API}/jobs/claim"): _claim,
    ("GET", f"{API}/jobs/{{id}}"): _get,
    ("POST", f"{API}/jobs/{{id}}/complete"): _complete,
    ("POST", f"{API}/jobs/{{id}}/fail"): _fail,
    ("POST", f"{API}/jobs/{{id}}/heartbeat"): _heartbeat,
    ("POST", f"{API}/jobs/{{id}}/retry"): _retry_one,
    ("POST", f"{API}/jobs/{{id}}/cancel"): _cancel_one,
    ("GET", f"{API}/stats"): _stats,
    ("GET", f"{API}/providers/status"): _providers,
    ("GET", f"{API}/infra/status"): _infra,
    ("GET", f"{API}/openapi.json"): _openapi,
    ("GET", f"{API}/limits"): _list_limits,
    ("PUT", f"{API}/limits/{{scope}}/{{name}}"): _set_limit,
    ("DELETE", f"{API}/limits/{{scope}}/{{name}}"): _delete_limit,
    ("POST", f"{API}/jobs/wait"): _wait,
    ("GET", f"{API}/jobs/{{id}}/dependencies"): _dependencies,
    ("GET", f"{API}/batches"): _list_batches,
    ("GET", f"{API}/batches/{{id}}"): _get_batch,
    ("POST", f"{API}/batches/{{id}}/cancel"): _cancel_batch,
    ("GET", f"{API}/webhooks"): _list_webhooks,
    ("PUT", f"{API}/webhooks/{{owner_service}}"): _set_webhook,
    ("DELETE", f"{API}/webhooks/{{owner_service}}"): _delete_webhook,
    ("GET", f"{API}/webhooks/{{owner_service}}/deliveries"): _list_deliveries,
    ("POST", f"{API}/webhooks/{{owner_service}}/deliveries/{{id}}/retry"): _retry_delivery,
}

WRONG_AUTHORIZATION: list[dict[str, str]] = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer wrong"},
    {"Authorization": TOKEN},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": f"Bearer  {TOKEN}"},
    {"Authorization": f"Bearer {TOKEN.upper()}"},
    {"X-Api-Key": TOKEN},
]
RIGHT = {"Authorization": f"Bearer {TOKEN}"}


def api_routes(app: web.Application) -> list[tuple[str, str]]:
    """(method, path template) of every route under /api/v1, HEAD included."""
    found = []
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        assert isinstance(path, str), info
        if path.startswith(f"{API}/"):
            found.append((route.method, path))
    assert found
    return sorted(set(found))


def sample_for(method: str, path: str) -> tuple[str, Sample]:
    """The sample call for a route; HEAD goes where GET goes."""
    key = ("GET" if method == "HEAD" else method, path)
    assert key in SAMPLES, f"no auth sample for {method} {path}: add one to SAMPLES"
    return method, SAMPLES[key]


@pytest.fixture
def jobs(store: JobStore, job_factory: JobFactory) -> Jobs:
    return Jobs(store, job_factory)


async def assert_unauthorized(response: Any, method: str) -> None:
    assert response.status == 401, (method, str(response.url), await response.text())
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    if method == "HEAD":
        return
    body = await response.json()
    assert body["error"]["code"] == "unauthorized"
    assert body["error"]["message"]
    assert TOKEN not in await response.text()


def test_samples_cover_every_api_route() -> None:
    # Built, never started: the router is complete without a database.
    routes = api_routes(create_app(Settings(database_url="postgresql://unused/db", service_token=TOKEN)))
    templates = {(("GET" if m == "HEAD" else m), p) for m, p in routes}
    assert templates == set(SAMPLES)


async def test_every_api_route_requires_the_bearer_token(api_factory: ClientFactory, jobs: Jobs) -> None:
    api = await api_factory(service_token=TOKEN)
    for method, path in api_routes(api.server.app):
        method, sample = sample_for(method, path)
        url, body, expected = await sample(jobs)
        before = await api.get(f"{API}/jobs?limit=500", headers=RIGHT)
        state = await before.json()

        for headers in WRONG_AUTHORIZATION:
            await assert_unauthorized(await api.request(method, url, json=body, headers=headers), method)
            # Auth comes before validation: a broken body is not even looked at.
            broken = await api.request(method, url, data=b"{nope", headers=headers | {"Content-Type": "text/plain"})
            await assert_unauthorized(broken, method)

        # Nothing was changed by the refused calls.
        after = await api.get(f"{API}/jobs?limit=500", headers=RIGHT)
        assert await after.json() == state, (method, path)

        response = await api.request(method, url, json=body, headers=RIGHT | JSON_HEADERS)
        assert response.status == expected, (method, path, await response.text())


async def test_unknown_api_paths_need_the_token_too(api_factory: ClientFactory) -> None:
    api = await api_factory(service_token=TOKEN)
    # "/" is the console's redirect (open, tests/test_console.py); any other path outside it is not.
    for path in (f"{API}/nope", f"{API}/jobs/1/explode", f"{API}/providers/nope", "/api/v2/jobs", "/nope", "/ui/nope"):
        await assert_unauthorized(await api.get(path), "GET")
        response = await api.get(path, headers=RIGHT)
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "not_found"
    # A known path with a method it does not serve.
    await assert_unauthorized(await api.delete(f"{API}/jobs"), "DELETE")
    assert (await api.delete(f"{API}/jobs", headers=RIGHT)).status == 405


async def test_probes_stay_open_with_a_token_configured(api_factory: ClientFactory) -> None:
    api = await api_factory(service_token=TOKEN)
    for path, headers in itertools.product(PUBLIC, [*WRONG_AUTHORIZATION, RIGHT]):
        response = await api.get(path, headers=headers)
        assert response.status == 200, (path, headers, await response.text())
        assert (await response.json())["status"] in ("ok", "ready")


async def test_without_a_token_configured_no_auth_is_needed(api: Client, jobs: Jobs) -> None:
    for method, path in api_routes(api.server.app):
        method, sample = sample_for(method, path)
        for headers in ({}, {"Authorization": "Bearer anything"}):
            url, body, expected = await sample(jobs)
            response = await api.request(method, url, json=body, headers=headers | JSON_HEADERS)
            assert response.status == expected, (method, path, headers, await response.text())
    for path in PUBLIC:
        assert (await api.get(path)).status == 200


async def test_a_refused_call_changes_nothing(api_factory: ClientFactory, jobs: Jobs) -> None:
    api = await api_factory(service_token=TOKEN)
    job = await jobs.running()
    waiting = await jobs.pending()
    body = {"worker_id": job.worker_id, "result": {"stolen": True}}
    await assert_unauthorized(await api.post(f"{API}/jobs/{job.id}/complete", json=body), "POST")
    await assert_unauthorized(await api.post(f"{API}/jobs/cancel", json={"all": True}), "POST")
    await assert_unauthorized(await api.post(f"{API}/jobs/claim", json={"worker_id": "thief", "limit": 10}), "POST")
    assert await jobs.status(job.id) == "running"
    assert await jobs.status(waiting.id) == "pending"
    assert (await jobs.store.get_job(job.id)).result is None


async def raw_get(port: int, path: str, authorization: bytes) -> tuple[int, bytes]:
    """A GET written byte for byte: HTTP clients refuse to send a header value that is not ASCII."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: %s\r\nConnection: close\r\n\r\n"
        % (path.encode(), authorization)
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize(
    "authorization",
    [b"Bearer \xff", b"Bearer \xc3\xa9t\xc3\xa9", b"Bearer " + TOKEN.encode() + b"\xff", b"\xff\xfe", b"Basic \x80"],
)
async def test_a_token_that_is_not_ascii_is_refused_not_an_error(
    api_factory: ClientFactory, authorization: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    api = await api_factory(service_token=TOKEN)
    status, body = await raw_get(api.server.port, f"{API}/jobs", authorization)
    assert status == 401, body
    assert json.loads(body)["error"]["code"] == "unauthorized"
    assert "unhandled error" not in caplog.text
    status, _ = await raw_get(api.server.port, f"{API}/jobs", f"Bearer {TOKEN}".encode())
    assert status == 200
