"""A database whose schema is not this code's: not yet migrated (MIGRATE_ON_START=false before
`aiservice migrate`), migrated by a newer release, or dropped under a running process. The API
answers 503 with a code that says what to do, /readyz says it too, the log says it once, the
worker waits instead of failing every claim, and both start when the schema arrives."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
import stubs
from aiohttp.test_utils import TestClient, TestServer
from conftest import job_spec
from stubs import AsrStub, OpenAIStub, wait_for, wait_for_status, worker_settings

from aiservice.api.app import create_app
from aiservice.api.handlers import STORE
from aiservice.db.migrate import load_functions, load_migrations, migrate
from aiservice.db.pool import connect, create_pool
from aiservice.db.schema import compare, read_ledger
from aiservice.db.store import JobStore
from aiservice.jobs import JobCreate
from aiservice.settings import Settings
from aiservice.worker.app import Worker

openai_stub = stubs.openai_stub
asr_stub = stubs.asr_stub

EXPECTED = len(load_migrations())


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    """`serve` in-process: create_app opening its own pool (as the command does) on ``dsn``."""
    clients: list[TestClient[Any, Any]] = []

    async def start(dsn: str, **overrides: Any) -> TestClient[Any, Any]:
        settings = Settings(database_url=dsn, worker_id="test", **({"migrate_on_start": False} | overrides))
        client: TestClient[Any, Any] = TestClient(TestServer(create_app(settings)))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


async def run_migrate(dsn: str) -> None:
    conn = await connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()


def schema_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "aiservice.schema" and r.levelno >= logging.WARNING]


async def test_before_migrate_the_api_is_not_ready_and_says_to_migrate_then_starts(
    empty_database_url: str, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    api = await serve(empty_database_url)

    ready = await api.get("/readyz")
    body = await ready.json()
    assert ready.status == 503, body
    assert body["status"] == "schema_not_migrated"
    assert (body["expected_migration"], body["found_migration"]) == (EXPECTED, 0)
    assert "aiservice migrate" in body["message"]

    for _ in range(5):
        listed = await api.get("/api/v1/jobs")
        error = (await listed.json())["error"]
        assert listed.status == 503 and error["code"] == "schema_not_migrated", error
        assert "aiservice migrate" in error["message"]
        created = await api.post("/api/v1/jobs", json=job_spec())
        assert created.status == 503 and (await created.json())["error"]["code"] == "schema_not_migrated"

    # Said once, not once per request (nor a traceback per background round).
    assert len(schema_warnings(caplog)) == 1, schema_warnings(caplog)
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]

    await run_migrate(empty_database_url)

    async def ready_now() -> bool:
        return (await api.get("/readyz")).status == 200

    await wait_for(ready_now, within=20, what="/readyz to turn 200 after the migration")
    assert (await api.post("/api/v1/jobs", json=job_spec())).status == 201


async def test_a_database_migrated_by_newer_code_is_refused_with_both_versions(database_url: str, serve: Any) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO aiservice.migrations (name, checksum) VALUES ('0099_future.sql', 'x')")
    finally:
        await conn.close()
    api = await serve(database_url)

    ready = await api.get("/readyz")
    body = await ready.json()
    assert ready.status == 503 and body["status"] == "schema_too_new", body
    assert (body["expected_migration"], body["found_migration"]) == (EXPECTED, 99)
    assert "upgrade aiservice" in body["message"] and "0099_future.sql" in body["message"]

    listed = await api.get("/api/v1/jobs")
    error = (await listed.json())["error"]
    assert listed.status == 503 and error["code"] == "schema_too_new", error
    assert f"the database is at migration 99, this code knows up to {EXPECTED}" in error["message"]


async def test_with_the_schema_in_place_requests_never_read_the_ledger(database_url: str, serve: Any) -> None:
    api = await serve(database_url)
    store: JobStore = api.server.app[STORE]
    assert store.schema is not None and store.schema.readings == 1  # at start

    for _ in range(20):
        assert (await api.get("/api/v1/jobs")).status == 200
        assert (await api.get("/readyz")).status == 200
    assert store.schema.readings == 1


async def test_a_schema_dropped_under_a_running_api_is_503_not_500(database_url: str, serve: Any) -> None:
    api = await serve(database_url)
    assert (await api.get("/api/v1/jobs")).status == 200
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DROP SCHEMA aiservice CASCADE")
    finally:
        await conn.close()

    listed = await api.get("/api/v1/jobs")
    error = (await listed.json())["error"]
    assert listed.status == 503 and error["code"] == "schema_not_migrated", error
    assert (await api.get("/readyz")).status == 503


async def test_a_worker_waits_for_the_schema_instead_of_failing_claims(
    settings: Settings,
    empty_database_url: str,
    openai_stub: OpenAIStub,
    asr_stub: AsrStub,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    worker = Worker(
        worker_settings(replace(settings, database_url=empty_database_url), openai_stub, asr_stub),
        listener_backoff=0.1,
    )
    await worker.start()
    try:
        report = await worker.readiness()
        assert not report["ready"] and report["schema"] == "schema_not_migrated", report
        assert (report["expected_migration"], report["found_migration"]) == (EXPECTED, 0)
        assert "aiservice migrate" in report["message"]
        assert worker.runner.claimer.last_poll_at is None  # no claim tried

        await run_migrate(empty_database_url)

        async def claiming() -> bool:
            return worker.runner.claimer.last_poll_at is not None

        await wait_for(claiming, within=20, what="the worker to claim after the migration")
        pool = await create_pool(empty_database_url, max_size=2, wait=5)
        try:
            store = JobStore(pool)
            job, _ = await store.create_job(JobCreate.model_validate(job_spec()))
            await wait_for_status(store, job.id, "completed", within=10)
        finally:
            await pool.close()
    finally:
        await worker.stop(grace=0)

    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "claim failed" in m or "claim skipped" in m], messages
    assert len(schema_warnings(caplog)) == 1, schema_warnings(caplog)


async def test_a_worker_migrates_at_start_with_migrate_on_start(
    settings: Settings, empty_database_url: str, openai_stub: OpenAIStub, asr_stub: AsrStub
) -> None:
    worker = Worker(
        worker_settings(
            replace(settings, database_url=empty_database_url, migrate_on_start=True), openai_stub, asr_stub
        )
    )
    await worker.start()
    try:
        assert "schema" not in await worker.readiness()  # no complaint
        conn = await connect(empty_database_url)
        try:
            assert compare(await read_ledger(conn), load_migrations(), load_functions()).ok
        finally:
            await conn.close()
    finally:
        await worker.stop(grace=0)
