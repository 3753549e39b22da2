"""`aiservice worker` as a real process: SIGTERM with jobs in flight, and SIGKILL mid-job."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import stubs
from aiohttp import web
from conftest import JobFactory
from processes import Command
from stubs import (
    OpenAIStub,
    WorkerFactory,
    echo,
    hang,
    slow,
    wait_for,
    wait_for_status,
)

from aiservice import errors
from aiservice.db.store import JobStore

# Fixtures shared by the worker tests.
openai_stub = stubs.openai_stub
asr_stub = stubs.asr_stub
worker_factory = stubs.worker_factory


Spawn = Callable[..., Command]


@pytest.fixture
def spawn_worker(database_url: str, openai_stub: OpenAIStub) -> Iterator[Spawn]:
    """Start `python -m aiservice.cli worker` against the test database; always killed afterwards."""
    started: list[Command] = []
    with tempfile.TemporaryDirectory(prefix="aiservice-worker-log-") as logs:

        def spawn(**env: str) -> Command:
            log = Path(logs) / f"worker-{len(started)}.log"
            environment = {
                **os.environ,
                "DATABASE_URL": database_url,
                "MIGRATE_ON_START": "false",
                "LLM_BASE_URL": openai_stub.base_url,
                "LLM_MODEL": "qwen2.5-14b",
                "WORKER_HTTP_HOST": "127.0.0.1",
                "WORKER_HTTP_PORT": "0",
                "WORKER_POLL_INTERVAL": "200ms",
                **env,
            }
            worker = Command(["worker"], environment, log)
            started.append(worker)
            return worker

        try:
            yield spawn
        finally:
            for worker in started:
                if worker.proc.poll() is None:
                    worker.proc.kill()
                worker.proc.wait(timeout=10)


async def test_sigterm_with_jobs_in_flight_loses_none(
    store: JobStore, job_factory: JobFactory, openai_stub: OpenAIStub, spawn_worker: Spawn
) -> None:
    openai_stub.on("finishes in grace", slow(1.0))
    openai_stub.on("never finishes", hang(openai_stub, "never finishes"))
    finishing = await job_factory(input={"user": "finishes in grace"}, priority=10)
    endless = await job_factory(input={"user": "never finishes"}, priority=10)
    queued = [await job_factory(input={"user": f"queued {n}"}) for n in range(3)]
    worker = spawn_worker(WORKER_CLAIM_LIMIT="2", WORKER_SHUTDOWN_GRACE="3s", WORKER_ID="terminated")

    await wait_for_status(store, finishing.id, "running", within=20)
    await wait_for_status(store, endless.id, "running", within=5)
    worker.proc.send_signal(signal.SIGTERM)

    assert await worker.exit_code(within=15) == 0, worker.output()
    done = await store.get_job(finishing.id)
    assert (done.status, (done.result or {}).get("content")) == ("completed", "echo: finishes in grace")
    # Handed back without using up an attempt; its provider call was closed.
    back = await store.get_job(endless.id)
    assert (back.status, back.attempts, back.lease_token, back.error_category) == (
        "pending",
        0,
        None,
        "worker_shutdown",
    )
    assert openai_stub.disconnects == ["never finishes"]
    for job in queued:
        again = await store.get_job(job.id)
        assert (again.status, again.attempts) == ("pending", 0)
    assert "released" in worker.output()


async def test_sigkill_mid_job_completes_elsewhere_and_the_late_result_is_refused(
    store: JobStore,
    job_factory: JobFactory,
    openai_stub: OpenAIStub,
    spawn_worker: Spawn,
    worker_factory: WorkerFactory,
) -> None:
    calls = 0
    first_hangs = hang(openai_stub, "killed mid-call")

    async def reply(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        return await (first_hangs if calls == 1 else echo)(request, body)

    openai_stub.on("survive me", reply)
    job = await job_factory(input={"user": "survive me"})
    doomed = spawn_worker(WORKER_LEASE_TIMEOUT="1s", WORKER_ID="doomed")
    running = await wait_for_status(store, job.id, "running", within=20)
    assert running.worker_id == "doomed"

    async def provider_called() -> bool:
        return calls == 1

    await wait_for(provider_called, what="the doomed worker to call the provider")
    doomed.proc.kill()
    assert await doomed.exit_code(within=5) == -signal.SIGKILL

    await worker_factory(worker_id="survivor", worker_lease_timeout=timedelta(seconds=1))
    done = await wait_for_status(store, job.id, "completed", within=10)

    assert (done.worker_id, done.attempts) == ("survivor", 2)
    assert (done.result or {})["content"] == "echo: survive me"
    # Whatever the dead worker would have sent, fencing refuses it.
    assert running.lease_token is not None
    with pytest.raises(errors.LeaseLost):
        await store.complete_job(job.id, "doomed", {"content": "late"}, lease_token=running.lease_token)
    with pytest.raises(errors.LeaseLost):
        await store.fail_job(job.id, "doomed", "timeout", "late", lease_token=running.lease_token)
    assert (await store.get_job(job.id)).result == done.result
