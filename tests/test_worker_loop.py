"""The worker loop: wake-ups by notification and by polling, the listener's reconnects, leases,
cancellation reaching the provider call, shutdown, and the worker's HTTP endpoints."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta

import aiohttp
import asyncpg
import stubs
from conftest import JobFactory
from prometheus_client.parser import text_string_to_metric_families
from stubs import (
    API_KEY,
    OpenAIStub,
    WorkerFactory,
    first_then,
    hang,
    slow,
    wait_for,
    wait_for_status,
    wait_until_listening,
)

from aiservice.db.store import JobStore
from aiservice.jobs import JobFilter, JobStatus
from aiservice.worker.kinds.llm import LLMKind
from aiservice.worker.runner import Runner

# Fixtures shared by the worker tests.
openai_stub = stubs.openai_stub
asr_stub = stubs.asr_stub
worker_factory = stubs.worker_factory


async def test_a_notification_wakes_an_idle_worker_long_before_the_poll_interval(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory
) -> None:
    worker = await worker_factory(worker_poll_interval=timedelta(seconds=30))
    await wait_until_listening(worker)

    job = await job_factory()

    # Well within the 30 s poll interval: only the notification can have woken the worker.
    done = await wait_for_status(store, job.id, "completed", within=5)
    assert done.worker_id == "test-worker"


async def test_a_job_due_later_is_claimed_when_due_without_polling(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory
) -> None:
    worker = await worker_factory(worker_poll_interval=timedelta(seconds=30))
    await wait_until_listening(worker)
    due = await job_factory()
    due_at = due.created_at + timedelta(seconds=1)

    job = await job_factory(run_at=due_at)

    done = await wait_for_status(store, job.id, "completed", within=5)
    assert done.started_at is not None and done.started_at >= due_at


async def test_polling_picks_up_jobs_while_the_listener_is_down_and_the_listener_reconnects(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, database_url: str
) -> None:
    # The listener waits ~3 s before reconnecting; the poll interval is 0.2 s.
    worker = await worker_factory(listener_backoff=3.0)
    await wait_until_listening(worker)
    assert worker.http_port is not None

    admin = await asyncpg.connect(database_url)
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name LIKE 'aiservice-listener%'"
        )
    finally:
        await admin.close()
    assert killed == 1

    async def disconnected() -> bool:
        return not worker.listener.connected

    await wait_for(disconnected, what="the listener to notice")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{worker.http_port}/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["listener"] == "disconnected"

        job = await job_factory()
        await wait_for_status(store, job.id, "completed", within=5)
        assert not worker.listener.connected, "picked up by polling while the listener was down"

        async def reconnected() -> bool:
            return worker.listener.connected

        await wait_for(reconnected, what="the listener to reconnect")
        assert worker.listener.reconnects == 1
        async with http.get(f"http://127.0.0.1:{worker.http_port}/readyz") as resp:
            assert resp.status == 200

    # Notifications work again: with polling practically off, a new job is still picked up at once.
    worker.runner.claimer.poll_interval = 30
    await asyncio.sleep(0.3)  # let the loop start its (now long) wait
    job = await job_factory()
    await wait_for_status(store, job.id, "completed", within=5)


async def test_cancelling_a_running_job_aborts_the_provider_call(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, openai_stub: OpenAIStub
) -> None:
    openai_stub.on("think forever", hang(openai_stub, "think forever"))
    worker = await worker_factory(worker_poll_interval=timedelta(seconds=30))
    job = await job_factory(input={"user": "think forever"})
    await wait_for_status(store, job.id, "running")

    cancelled = await store.cancel_job(job.id)
    assert cancelled.status == "cancelled"

    # The worker hears the abort, finds its lease gone and closes the request.
    await asyncio.wait_for(openai_stub.disconnected.wait(), timeout=5)
    assert openai_stub.disconnects == ["think forever"]

    async def idle() -> bool:
        return worker.runner.in_flight == 0

    await wait_for(idle, what="the worker to drop the job")
    after = await store.get_job(job.id)
    assert (after.status, after.result, after.error_category) == ("cancelled", None, None)
    assert worker.runner.counts.aborted == 1
    assert worker.runner.counts.completed == worker.runner.counts.failed == 0


async def test_a_running_job_reset_elsewhere_is_stopped_and_run_again(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, openai_stub: OpenAIStub
) -> None:
    openai_stub.on("again", first_then(hang(openai_stub, "first try")))
    worker = await worker_factory(worker_poll_interval=timedelta(seconds=30))
    job = await job_factory(input={"user": "again"})
    await wait_for_status(store, job.id, "running")

    await store.retry_job(job.id)

    done = await wait_for_status(store, job.id, "completed", within=5)
    assert (done.result or {})["content"] == "echo: again"
    assert done.attempts == 1  # retry_job starts the attempts over
    assert openai_stub.disconnects == ["first try"]
    assert worker.runner.counts.aborted == 1 and worker.runner.counts.completed == 1


async def test_heartbeats_keep_a_job_longer_than_its_lease(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, openai_stub: OpenAIStub
) -> None:
    openai_stub.on("long job", slow(2.5))
    lease = timedelta(seconds=1)
    await worker_factory(worker_lease_timeout=lease, worker_id="holder")
    job = await job_factory(input={"user": "long job"})
    await wait_for_status(store, job.id, "running")
    # A second worker polling fast would take the job over if the first let its lease lapse.
    await worker_factory(
        worker_lease_timeout=lease, worker_id="thief", worker_poll_interval=timedelta(milliseconds=100)
    )

    done = await wait_for_status(store, job.id, "completed", within=10)

    assert (done.worker_id, done.attempts) == ("holder", 1)
    assert len(openai_stub.requests) == 1


async def test_claims_only_into_free_slots(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, openai_stub: OpenAIStub
) -> None:
    openai_stub.on("hold", slow(0.5))
    jobs = [await job_factory(input={"user": "hold"}) for _ in range(5)]
    worker = await worker_factory(worker_claim_limit=2)

    peak = 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        # One statement, so the count is a consistent snapshot.
        running = await store.list_jobs(JobFilter(status=[JobStatus.RUNNING]), before_id=None, limit=100)
        peak = max(peak, len(running))
        assert worker.runner.in_flight <= 2
        if not running and [(await store.get_job(j.id)).status for j in jobs] == ["completed"] * 5:
            break
        await asyncio.sleep(0.02)

    assert [(await store.get_job(j.id)).status for j in jobs] == ["completed"] * 5
    assert peak <= 2
    assert worker.runner.counts.claimed == 5


async def test_shutdown_finishes_jobs_in_grace_and_hands_back_the_rest(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, openai_stub: OpenAIStub
) -> None:
    openai_stub.on("quick enough", slow(0.5))
    openai_stub.on("endless", hang(openai_stub, "endless"))
    worker = await worker_factory(worker_claim_limit=2)
    quick = await job_factory(input={"user": "quick enough"}, priority=10)
    endless = await job_factory(input={"user": "endless"}, priority=10)
    await wait_for_status(store, quick.id, "running")
    await wait_for_status(store, endless.id, "running")
    waiting = await job_factory()

    await worker.stop(grace=1.5)

    assert (await store.get_job(quick.id)).status == "completed"
    released = await store.get_job(endless.id)
    assert (released.status, released.attempts, released.error_category) == ("pending", 0, "worker_shutdown")
    assert (await store.get_job(waiting.id)).status == "pending"
    assert openai_stub.disconnects == ["endless"]
    assert worker.runner.counts.released == 1


async def test_worker_endpoints(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, openai_stub: OpenAIStub
) -> None:
    openai_stub.on("busy", hang(openai_stub, "busy"))
    worker = await worker_factory()
    await wait_until_listening(worker)
    done = await job_factory()
    await wait_for_status(store, done.id, "completed")
    running = await job_factory(input={"user": "busy"})
    await wait_for_status(store, running.id, "running")
    base = f"http://127.0.0.1:{worker.http_port}"

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as resp:
            assert (resp.status, await resp.json()) == (200, {"status": "ok"})
        async with http.get(f"{base}/readyz") as resp:
            body = await resp.json()
            assert resp.status == 200
            assert body == {"status": "ready", "ready": True, "database": "ok", "listener": "connected"}
        async with http.get(f"{base}/worker/status") as resp:
            assert resp.status == 200
            text = await resp.text()
        async with http.get(f"{base}/metrics") as resp:
            assert resp.status == 200
            exposition = await resp.text()

    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }
    finished = (
        "aiservice_jobs_finished_total",
        (("error_category", ""), ("model_profile", "qwen2.5-14b"), ("status", "completed"), ("task_type", "llm_chat")),
    )
    assert found[finished] >= 1
    assert found[("aiservice_worker_slots", (("state", "busy"),))] >= 1
    assert found[("aiservice_llm_tokens_total", (("kind", "prompt"), ("model", "qwen2.5-14b")))] > 0
    assert any(name == "aiservice_job_run_seconds_count" for name, _ in found)

    status = json.loads(text)
    assert status["worker_id"] == "test-worker"
    assert status["serves"] == [
        {
            "worker": "llm",
            "task_types": ["llm_chat", "chat_completion", "call_analysis"],
            "model_profiles": ["qwen2.5-14b"],
        },
        {"worker": "whisperx", "task_types": ["transcribe"], "model_profiles": ["whisperx"]},
    ]
    (flight,) = status["in_flight"]
    assert flight["id"] == running.id and flight["age_seconds"] >= 0
    assert status["counts"]["completed"] == 1 and status["counts"]["failed"] == 0
    assert status["counts"]["retried"] == 0
    assert status["last_claim_at"] is not None
    assert status["listener"]["state"] == "connected"
    assert status["settings"]["LLM_API_KEY"] == "***"
    assert status["settings"]["WORKER_ID"] == "test-worker"
    assert API_KEY not in text


async def test_a_result_after_the_lease_was_taken_over_is_discarded(
    store: JobStore, job_factory: JobFactory, openai_stub: OpenAIStub
) -> None:
    # No listener and heartbeats far apart: nothing tells this runner that its lease was lost
    # until it tries to store the result.
    openai_stub.on("late", slow(1.5))
    llm = LLMKind(base_url=openai_stub.base_url, api_key=None, model="qwen2.5-14b", timeout=timedelta(seconds=30))
    runner = Runner(
        store,
        [llm],
        worker_id="slowpoke",
        claim_limit=1,
        lease_timeout=timedelta(milliseconds=300),
        poll_interval=timedelta(seconds=30),
        heartbeat_interval=timedelta(seconds=30),
    )
    job = await job_factory(input={"user": "late"})
    runner.start()
    try:
        first = await wait_for_status(store, job.id, "running")
        assert first.worker_id == "slowpoke"
        await asyncio.sleep(0.4)
        (taken,) = await store.claim_jobs("other", 1, lease_timeout=timedelta(minutes=5))
        assert taken.id == job.id

        async def settled() -> bool:
            return runner.in_flight == 0

        await wait_for(settled, what="the slow runner to finish")
        assert runner.counts.discarded == 1 and runner.counts.completed == 0
        after = await store.get_job(job.id)
        assert (after.status, after.worker_id, after.result) == ("running", "other", None)
    finally:
        await runner.shutdown(grace=0)
        await llm.close()
