"""aiservice.client against the live API on real PostgreSQL, and against a stub speaking real HTTP
for the retries."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import stubs
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import ClientFactory, JobFactory
from example_telephony import analysis_of, enqueue_call
from stubs import AsrStub, OpenAIStub, StubServer, WorkerFactory

from aiservice.client import (
    AiserviceError,
    AsyncClient,
    BadRequest,
    Conflict,
    Invalid,
    LeaseLost,
    NotFound,
    Unauthorized,
    Unavailable,
    error_from,
)
from aiservice.db.store import JobStore
from aiservice.jobs import Job, JobStatus

openai_stub = stubs.openai_stub
asr_stub = stubs.asr_stub
worker_factory = stubs.worker_factory

TOKEN = "client-test-token"
LEASE = timedelta(minutes=5)
ROOT = Path(__file__).resolve().parents[1]


def base_url(api: TestClient[Any, Any]) -> str:
    return str(api.server.make_url("")).rstrip("/")


@pytest.fixture
async def client(api_factory: ClientFactory) -> AsyncIterator[AsyncClient]:
    api = await api_factory(service_token=TOKEN)
    async with AsyncClient(base_url(api), token=TOKEN, backoff=0.01) as c:
        yield c


def spec(n: int | str, **overrides: Any) -> dict[str, Any]:
    return {
        "owner_service": "telephony",
        "owner_ref": f"beeline/{n}",
        "task_type": "llm_chat",
        "model_profile": "qwen2.5-14b",
        "input": {"user": f"hello {n}"},
    } | overrides


async def finish_later(store: JobStore, ids: list[int], delay: float = 0.3) -> None:
    """Claim and complete the jobs through the store, as a worker would, after a moment."""
    await asyncio.sleep(delay)
    claimed = await store.claim_jobs("bg-worker", len(ids), lease_timeout=LEASE)
    for job in claimed:
        if job.id in ids:
            await store.complete_job(job.id, "bg-worker", {"content": f"done {job.id}"}, lease_token=job.lease_token)


# Creating and reading


async def test_create_get_and_an_idempotent_repeat(client: AsyncClient) -> None:
    job = await client.create_job(**spec(1), priority=5, idempotency_key="beeline/1/analysis")
    assert isinstance(job, Job)
    assert (job.status, job.priority, job.idempotency_key) == (JobStatus.PENDING, 5, "beeline/1/analysis")
    again = await client.create_job(**spec(1), priority=5, idempotency_key="beeline/1/analysis")
    assert again.id == job.id
    other = await client.create_job(**spec(2), run_at=datetime.now(UTC) + timedelta(hours=1))
    assert other.id != job.id and other.run_at > datetime.now(UTC)

    got = await client.get_job(job.id)
    assert got.model_dump() == job.model_dump()
    assert (await client.get_job(job.id, wait=0.1)).status == JobStatus.PENDING


async def test_a_batch_with_dependencies_then_get_and_cancel_it(client: AsyncClient) -> None:
    created = await client.create_jobs(
        [{"owner_ref": "call/1"}, {"owner_ref": "call/2", "depends_on": ["$0"], "input": {"user": "x"}}],
        defaults={"owner_service": "telephony", "task_type": "llm_chat", "model_profile": "qwen2.5-14b"},
    )
    assert created.batch_id is not None
    first, second = created.jobs
    assert {first.batch_id, second.batch_id} == {created.batch_id}
    assert (first.blocked, second.blocked) == (False, True)

    batch = await client.get_batch(created.batch_id)
    assert (batch.status, batch.counts.total, batch.counts.pending) == ("in_progress", 2, 2)
    listed = await client.list_jobs(batch_id=created.batch_id)
    assert [j.id for j in listed.jobs] == [second.id, first.id]

    cancelled = await client.cancel_batch(created.batch_id)
    assert cancelled.counts.cancelled + cancelled.counts.failed == 2 and cancelled.status == "finished"
    with pytest.raises(NotFound):
        await client.get_batch(created.batch_id + 1000)


async def test_a_repeated_batch_with_keys_returns_the_same_jobs(client: AsyncClient) -> None:
    jobs: list[dict[str, Any]] = [spec("k1", idempotency_key="k1"), spec("k2", idempotency_key="k2")]
    first = await client.create_jobs(jobs)
    again = await client.create_jobs(jobs)
    assert [j.id for j in again.jobs] == [j.id for j in first.jobs]
    assert first.batch_id is not None and again.batch_id is None


async def test_iter_jobs_walks_every_page_newest_first(client: AsyncClient, job_factory: JobFactory) -> None:
    made = [await job_factory(owner_service="paging") for _ in range(7)]
    await job_factory(owner_service="elsewhere")
    page = await client.list_jobs(owner_service="paging", limit=3)
    assert len(page.jobs) == 3 and page.next_cursor == str(page.jobs[-1].id)
    seen = [job.id async for job in client.iter_jobs(owner_service="paging", page_size=3)]
    assert seen == [job.id for job in reversed(made)]
    pending = [job.id async for job in client.iter_jobs(owner_service="paging", status=["pending", JobStatus.FAILED])]
    assert len(pending) == 7
    assert [j async for j in client.iter_jobs(owner_service="paging", status="completed")] == []


# Waiting


async def test_wait_for_one_job_and_for_many(client: AsyncClient, store: JobStore, job_factory: JobFactory) -> None:
    one = await job_factory()
    background = asyncio.create_task(finish_later(store, [one.id]))
    done = await client.wait(one.id, timeout=10)
    await background
    assert done.status == JobStatus.COMPLETED and done.result == {"content": f"done {one.id}"}

    many = [await job_factory() for _ in range(3)]
    ids = [j.id for j in many]
    background = asyncio.create_task(finish_later(store, ids))
    finished = await client.wait([*ids, ids[0]], timeout=10)
    await background
    assert [j.id for j in finished] == [*ids, ids[0]]
    assert {j.status for j in finished} == {JobStatus.COMPLETED}

    # The overall timeout passes: the state then, not an error.
    slow = await job_factory()
    assert (await client.wait(slow.id, timeout=0.2)).status == JobStatus.PENDING
    (still,) = await client.wait([slow.id], timeout=0.2)
    assert still.status == JobStatus.PENDING
    # mode any: the first finished job is enough.
    first_of = await client.wait([slow.id, one.id], timeout=10, mode="any")
    assert [j.status for j in first_of] == [JobStatus.PENDING, JobStatus.COMPLETED]
    assert await client.wait([], timeout=1) == []
    with pytest.raises(NotFound):
        await client.wait([slow.id, 10**12], timeout=1)


async def test_wait_jobs_is_the_single_server_wait(client: AsyncClient, job_factory: JobFactory) -> None:
    job = await job_factory()
    (state,) = await client.wait_jobs([job.id], timeout=0.1, mode="all")
    assert state.status == JobStatus.PENDING
    with pytest.raises(Invalid):
        await client.wait_jobs([job.id], timeout=61)


# External workers and fencing


async def test_claim_heartbeat_complete_and_fail_with_fencing(client: AsyncClient, job_factory: JobFactory) -> None:
    a = await job_factory(task_type="ocr")
    b = await job_factory(task_type="ocr")
    claimed = await client.claim_jobs("gpu-1", 2, task_types=["ocr"], lease_timeout=timedelta(minutes=1))
    assert sorted(j.id for j in claimed) == sorted([a.id, b.id])
    tokens = {j.id: j.lease_token for j in claimed}
    assert all(tokens.values())

    lease = await client.heartbeat_job(a.id, "gpu-1", lease_timeout=120, lease_token=tokens[a.id])
    assert lease.id == a.id and lease.lease_expires_at > datetime.now(UTC) + timedelta(seconds=90)
    completed = await client.complete_job(a.id, "gpu-1", {"text": "ok"}, lease_token=tokens[a.id])
    assert (completed.status, completed.result) == (JobStatus.COMPLETED, {"text": "ok"})

    # b is reset and claimed again: the first claim's token is stale.
    await client.retry_job(b.id)
    (again,) = await client.claim_jobs("gpu-1", task_types=["ocr"])
    assert again.id == b.id and again.lease_token != tokens[b.id]
    old = tokens[b.id]
    for stale in (
        lambda: client.complete_job(b.id, "gpu-1", {"text": "old"}, lease_token=old),
        lambda: client.fail_job(b.id, "gpu-1", "timeout", "old attempt", lease_token=str(old)),
        lambda: client.heartbeat_job(b.id, "gpu-1", lease_token=old),
        lambda: client.complete_job(b.id, "gpu-2", {"text": "not mine"}),
    ):
        with pytest.raises(LeaseLost) as lost:
            await stale()
        assert isinstance(lost.value, Conflict)
        assert (lost.value.status, lost.value.code) == (409, "lease_lost") and lost.value.message

    failed = await client.fail_job(b.id, "gpu-1", "rate_limited", "429", retry_after=30, lease_token=again.lease_token)
    assert failed.status == JobStatus.PENDING and failed.error_category == "rate_limited"
    assert failed.run_at > datetime.now(UTC) + timedelta(seconds=20)


async def test_retry_and_cancel_by_id_and_by_filter(client: AsyncClient, job_factory: JobFactory) -> None:
    jobs = [await job_factory(owner_service="ops") for _ in range(3)]
    cancelled = await client.cancel_job(jobs[0].id)
    assert cancelled.status == JobStatus.CANCELLED
    affected = await client.cancel_jobs(owner_service="ops", status=["pending"])
    assert (affected.count, sorted(affected.ids)) == (2, sorted(j.id for j in jobs[1:]))
    assert (await client.retry_jobs(ids=[j.id for j in jobs])).count == 0  # cancelled jobs are not retried
    with pytest.raises(Invalid):
        await client.cancel_jobs()  # an empty selection is refused unless all=True
    assert (await client.cancel_jobs(all=True)).count == 0


# Errors


async def test_each_error_is_typed_and_carries_the_servers_message(
    client: AsyncClient, api_factory: ClientFactory, job_factory: JobFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(NotFound) as missing:
        await client.get_job(10**12)
    assert (missing.value.status, missing.value.code) == (404, "not_found") and missing.value.message

    job = await job_factory()
    await client.cancel_job(job.id)
    with pytest.raises(Conflict) as conflict:
        await client.cancel_job(job.id)
    assert not isinstance(conflict.value, LeaseLost)
    assert (conflict.value.status, conflict.value.code) == (409, "invalid_state")

    with pytest.raises(Invalid) as invalid:
        await client.create_job(**spec(3), priority=5000)
    assert (invalid.value.status, invalid.value.code) == (422, "invalid_argument")
    assert invalid.value.message.startswith("priority")
    assert invalid.value.details[0]["loc"] == ["priority"]

    api = await api_factory(service_token=TOKEN)
    async with AsyncClient(base_url(api), token="wrong-token") as wrong:
        with pytest.raises(Unauthorized) as refused:
            await wrong.list_limits()
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    assert isinstance(refused.value, AiserviceError)

    monkeypatch.setenv("AI_SERVICE_TOKEN", TOKEN)  # the token from the environment when none is given
    async with AsyncClient(base_url(api)) as from_env:
        assert await from_env.list_limits() == []


def test_error_answers_map_to_their_exceptions() -> None:
    cases = {
        (400, b'{"error": {"code": "bad_request", "message": "body is not valid JSON"}}'): BadRequest,
        (413, b'{"error": {"code": "payload_too_large", "message": "too big"}}'): BadRequest,
        (415, b'{"error": {"code": "unsupported_media_type", "message": "json"}}'): BadRequest,
        (503, b'{"error": {"code": "database_unavailable", "message": "down"}}'): Unavailable,
        (502, b"<html>Bad Gateway</html>"): Unavailable,
        (500, b"oops"): AiserviceError,
    }
    for (status, body), kind in cases.items():
        error = error_from(status, body)
        assert type(error) is kind and error.status == status
    gateway = error_from(502, b"<html>Bad Gateway</html>")
    assert (gateway.code, gateway.message) == ("http_502", "<html>Bad Gateway</html>")


# Limits, webhooks, observability


async def test_limits_set_list_and_delete(client: AsyncClient) -> None:
    limit = await client.set_limit("task_type", "transcribe", paused=True, max_running=4)
    assert (limit.scope, limit.name, limit.paused, limit.max_running) == ("task_type", "transcribe", True, 4)
    limit = await client.set_limit("task_type", "transcribe", max_running=None)  # None clears, paused kept
    assert (limit.paused, limit.max_running) == (True, None)
    await client.set_limit("model_profile", "qwen2.5-14b/v2", max_tokens_per_minute=200_000)
    assert {(lim.scope, lim.name) for lim in await client.list_limits()} == {
        ("task_type", "transcribe"),
        ("model_profile", "qwen2.5-14b/v2"),
    }
    with pytest.raises(Invalid):
        await client.set_limit("owner_service", "telephony", weight=0)
    await client.delete_limit("task_type", "transcribe")
    await client.delete_limit("model_profile", "qwen2.5-14b/v2")  # a slash in a name is one path segment
    assert await client.list_limits() == []
    with pytest.raises(NotFound):
        await client.delete_limit("task_type", "transcribe")


async def test_webhooks_set_list_without_secret_and_delete(client: AsyncClient) -> None:
    hook = await client.set_webhook("telephony", "https://telephony.internal/hook", events=["batch.finished"])
    assert hook.secret is not None and hook.secret.startswith("whsec_")
    assert hook.events == ["batch.finished"]
    changed = await client.set_webhook("telephony", "https://telephony.internal/hook2")
    assert changed.secret is None and changed.url.endswith("/hook2")
    rotated = await client.set_webhook("telephony", "https://telephony.internal/hook2", rotate_secret=True)
    assert rotated.secret not in (None, hook.secret)
    (listed,) = await client.list_webhooks()
    assert (listed.owner_service, listed.secret) == ("telephony", None)
    page = await client.list_deliveries("telephony", status="failed", limit=10)
    assert (page.deliveries, page.next_cursor) == ([], None)
    with pytest.raises(NotFound):
        await client.retry_delivery("telephony", 10**12)
    with pytest.raises(Invalid):
        await client.set_webhook("telephony", "ftp://telephony.internal/hook")
    await client.delete_webhook("telephony")
    assert await client.list_webhooks() == []
    with pytest.raises(NotFound):
        await client.delete_webhook("telephony")


async def test_stats_providers_and_infra(client: AsyncClient, job_factory: JobFactory) -> None:
    await job_factory()
    stats = await client.stats(window=timedelta(minutes=5))
    assert stats.window_seconds == 300
    assert sum(s.count for s in stats.by_status if s.status == JobStatus.PENDING) == 1
    assert (await client.providers_status()).providers
    assert (await client.infra_status()).configured is False


# Retries, against a stub that speaks real HTTP


class FlakyApi(StubServer):
    """Answers 503 to the first ``failures`` requests of each path, then 200 with ``job``."""

    def __init__(self, job: dict[str, Any], failures: int) -> None:
        super().__init__()
        self.job = job
        self.failures = failures
        self.hits: dict[str, int] = {}
        self.app.router.add_route("*", "/{tail:.*}", self._any)

    async def _any(self, request: web.Request) -> web.StreamResponse:
        key = f"{request.method} {request.path}"
        self.hits[key] = self.hits.get(key, 0) + 1
        if self.hits[key] <= self.failures:
            body = {"error": {"code": "database_unavailable", "message": "PostgreSQL is unavailable"}}
            return web.json_response(body, status=503)
        return web.json_response(self.job, status=201 if request.method == "POST" else 200)


FlakyFactory = Callable[[int], Awaitable[FlakyApi]]


@pytest.fixture
async def flaky_api(job_factory: JobFactory) -> AsyncIterator[FlakyFactory]:
    job = (await job_factory()).model_dump(mode="json")
    servers: list[FlakyApi] = []

    async def make(failures: int) -> FlakyApi:
        server = FlakyApi(job, failures)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


async def test_idempotent_calls_are_retried_on_503(flaky_api: FlakyFactory) -> None:
    stub = await flaky_api(2)
    async with AsyncClient(stub.url, backoff=0.01) as c:
        job = await c.get_job(1)
        await c.create_job(**spec(4), idempotency_key="key-4")
        await c.delete_limit("task_type", "x")
    assert job.id == stub.job["id"]
    assert stub.hits == {"GET /api/v1/jobs/1": 3, "POST /api/v1/jobs": 3, "DELETE /api/v1/limits/task_type/x": 3}


async def test_non_idempotent_posts_are_sent_once(flaky_api: FlakyFactory) -> None:
    stub = await flaky_api(2)
    async with AsyncClient(stub.url, backoff=0.01) as c:
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: c.create_job(**spec(5)),
            lambda: c.cancel_job(1),
            lambda: c.complete_job(1, "w", {}),
            lambda: c.create_jobs([spec(6), spec(7, idempotency_key="k7")]),  # not every job has a key
        ]
        for call in calls:
            with pytest.raises(Unavailable) as unavailable:
                await call()
            assert (unavailable.value.status, unavailable.value.code) == (503, "database_unavailable")
    assert set(stub.hits.values()) == {1} and len(stub.hits) == 4


async def test_retries_are_bounded(flaky_api: FlakyFactory) -> None:
    stub = await flaky_api(100)
    async with AsyncClient(stub.url, backoff=0.01, max_tries=4) as c:
        with pytest.raises(Unavailable):
            await c.get_job(1)
    assert stub.hits == {"GET /api/v1/jobs/1": 4}


async def test_connection_errors_are_retried_then_raised_as_unavailable(flaky_api: FlakyFactory) -> None:
    stub = await flaky_api(0)
    url = stub.url
    await stub.close()  # nothing listens there any more
    async with AsyncClient(url, backoff=0.01) as c:
        with pytest.raises(Unavailable) as down:
            await c.get_job(1)
    assert (down.value.status, down.value.code) == (0, "connection_error")


# The README example


async def test_the_readme_example_runs_the_call_pipeline(
    api_factory: ClientFactory, worker_factory: WorkerFactory, openai_stub: OpenAIStub, asr_stub: AsrStub
) -> None:
    api = await api_factory(service_token=TOKEN)
    await worker_factory()
    asr_stub.files["42.wav"] = b"call audio"
    openai_stub.on(
        "Classify this call. Transcript: Hello there. General Kenobi.",
        stubs.answer('{"topic": "greeting", "sentiment": "positive"}'),
    )
    async with AsyncClient(base_url(api), token=TOKEN) as c:
        job_id = await enqueue_call(c, "42", f"{asr_stub.url}/files/42.wav")
        assert await enqueue_call(c, "42", f"{asr_stub.url}/files/42.wav") == job_id  # idempotent
        assert await analysis_of(c, job_id, seconds=30) == {"topic": "greeting", "sentiment": "positive"}
        transcription = (await c.list_jobs(owner_ref="beeline/42", task_type="transcribe")).jobs[0]
        assert transcription.status == JobStatus.COMPLETED


def test_the_readme_shows_the_example_as_it_is_tested() -> None:
    example = (ROOT / "tests" / "example_telephony.py").read_text()
    code = example[example.index("from __future__") :]
    assert code in (ROOT / "README.md").read_text(), "copy tests/example_telephony.py into the README"


def test_the_client_reads_no_other_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AI_SERVICE_TOKEN", "from-env")
    assert AsyncClient("http://x")._headers == {"Authorization": "Bearer from-env"}
    assert AsyncClient("http://x", token="given")._headers == {"Authorization": "Bearer given"}
    monkeypatch.delenv("AI_SERVICE_TOKEN")
    assert AsyncClient("http://x/")._headers == {} and AsyncClient("http://x/").base_url == "http://x"


def test_the_client_imports_nothing_of_the_server() -> None:
    """Other services import the client: no database driver, repository or worker comes with it."""
    code = (
        "import sys, aiservice.client; print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('asyncpg', 'worker', 'openai') or "
        "m.startswith(('aiservice.db', 'aiservice.api.handlers', 'aiservice.worker'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "[]"
