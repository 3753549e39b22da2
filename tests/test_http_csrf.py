"""Cross-site requests: without a token (the development default) a page on another site could make a
browser POST a form, or a body-less fetch, to the API. Every state-changing route wants
Content-Type: application/json (or an X-Requested-With header), which a browser only sends
cross-site after a CORS preflight that this API never grants."""

from __future__ import annotations

import re
from typing import Any

from conftest import JSON_HEADERS, ClientFactory, JobFactory

from aiservice.api.handlers import ROUTES
from aiservice.db.store import JobStore

API = "/api/v1"
SIMPLE = [  # what a form or a no-cors fetch on another origin can send without a preflight
    {"Content-Type": "text/plain"},
    {"Content-Type": "application/x-www-form-urlencoded"},
    {"Content-Type": "multipart/form-data; boundary=x"},
    {},
]


def concrete(path: str, job_id: int) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: str(job_id) if m.group(1) == "id" else "telephony", path)


async def test_every_state_changing_route_refuses_a_simple_cross_site_request(
    api_factory: ClientFactory, job_factory: JobFactory, store: JobStore
) -> None:
    api = await api_factory()
    job = await job_factory()
    routes = [r for r in ROUTES if r.method != "GET"]
    assert {"/api/v1/jobs/{id}/cancel", "/api/v1/jobs/{id}/retry", "/api/v1/batches/{id}/cancel"} <= {
        r.path for r in routes
    }
    for route in routes:
        for headers in SIMPLE:
            data = b"owner_service=x" if headers else None
            response = await api.request(route.method, concrete(route.path, job.id), data=data, headers=headers)
            assert response.status == 415, (route.method, route.path, headers, await response.text())
            error = (await response.json())["error"]
            assert error["code"] == "unsupported_media_type"
            assert "application/json" in error["message"]
    assert (await store.get_job(job.id)).status == "pending"  # nothing was cancelled


async def test_fetch_style_requests_pass(api_factory: ClientFactory, job_factory: JobFactory) -> None:
    api = await api_factory()
    first, second, third = await job_factory(), await job_factory(), await job_factory()
    # A body-less POST that says JSON, as the console and the typed client send it; with a charset
    # parameter; or with X-Requested-With instead.
    for job, headers in (
        (first, JSON_HEADERS),
        (second, {"Content-Type": "application/json; charset=utf-8"}),
        (third, {"X-Requested-With": "fetch"}),
    ):
        cancelled = await api.post(f"{API}/jobs/{job.id}/cancel", headers=headers)
        assert (cancelled.status, (await cancelled.json())["status"]) == (200, "cancelled"), headers
    # Reads need nothing; an unknown route is still 404 and a wrong method 405.
    assert (await api.get(f"{API}/jobs/{first.id}")).status == 200
    assert (await api.post(f"{API}/nothing-here")).status == 404
    assert (await api.delete(f"{API}/jobs")).status == 405


async def test_a_token_is_checked_first(api_factory: ClientFactory, job_factory: JobFactory) -> None:
    api = await api_factory(service_token="tok-csrf")
    job = await job_factory()
    assert (await api.post(f"{API}/jobs/{job.id}/cancel")).status == 401
    bearer: dict[str, Any] = {"Authorization": "Bearer tok-csrf"}
    assert (await api.post(f"{API}/jobs/{job.id}/cancel", headers=bearer)).status == 415
    assert (await api.post(f"{API}/jobs/{job.id}/cancel", headers=bearer | JSON_HEADERS)).status == 200
