"""The built-in workers under limits: no spinning while everything they serve is held, and a
resume (or a freed place under a cap) wakes them through a notification, not the next poll."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import stubs
from conftest import JobFactory
from stubs import WorkerFactory, wait_for, wait_for_outcome, wait_for_status, wait_until_listening

from aiservice.db.store import JobStore
from aiservice.jobs import Job
from aiservice.worker.failure import JobFailure

openai_stub = stubs.openai_stub
asr_stub = stubs.asr_stub
worker_factory = stubs.worker_factory

POLL = timedelta(seconds=30)  # far longer than any wait below: only notifications can explain pickups


class Tally:
    """Jobs running at once across every worker that shares it, and the most ever seen."""

    running = 0
    peak = 0


class Instant:
    name = "instant"
    task_types: tuple[str, ...] = ("instant",)
    model_profiles: tuple[str, ...] = ("m",)

    def __init__(self, delay: float = 0.0, tally: Tally | None = None) -> None:
        self.delay = delay
        self.tally = tally or Tally()

    async def run(self, job: Job) -> dict[str, Any]:
        self.tally.running += 1
        self.tally.peak = max(self.tally.peak, self.tally.running)
        try:
            await asyncio.sleep(self.delay)
            return {"ok": job.id}
        finally:
            self.tally.running -= 1

    async def close(self) -> None:
        return None


def count_claims(store: JobStore) -> list[int]:
    """Wrap the worker's store so each claim_jobs call is counted."""
    calls: list[int] = []
    claim = store.claim_jobs

    async def counted(*args: Any, **kwargs: Any) -> list[Job]:
        jobs = await claim(*args, **kwargs)
        calls.append(len(jobs))
        return jobs

    store.claim_jobs = counted  # type: ignore[method-assign]
    return calls


async def test_a_paused_task_type_is_not_claimed_and_resuming_wakes_the_worker(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory
) -> None:
    worker = await worker_factory(kinds=[Instant()], worker_poll_interval=POLL)
    await wait_until_listening(worker)
    calls = count_claims(worker.runner.claimer.store)
    await store.set_limit("task_type", "instant", {"paused": True})
    jobs = [await job_factory(task_type="instant", model_profile="m") for _ in range(3)]
    await asyncio.sleep(1.0)
    assert sum(calls) == 0
    assert len(calls) <= 5, f"{len(calls)} empty claims in a second: the worker spins"
    assert {(await store.get_job(j.id)).status for j in jobs} == {"pending"}

    resumed = time.monotonic()
    await store.set_limit("task_type", "instant", {"paused": False})
    for job in jobs:
        await wait_for_status(store, job.id, "completed", within=5)
    assert time.monotonic() - resumed < 5  # a notification, not the 30 s poll


async def test_a_cap_across_workers_holds_and_a_finished_job_makes_room(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory
) -> None:
    tally = Tally()
    for kind in (Instant(0.2, tally), Instant(0.2, tally)):
        worker = await worker_factory(kinds=[kind], worker_poll_interval=POLL, worker_claim_limit=4)
        await wait_until_listening(worker)
    await store.set_limit("model_profile", "m", {"max_running": 2})
    jobs = [await job_factory(task_type="instant", model_profile="m") for _ in range(10)]

    async def all_done() -> bool:
        return [(await store.get_job(j.id)).status for j in jobs] == ["completed"] * len(jobs)

    await wait_for(all_done, within=15, what="every job to complete under the cap")
    assert tally.peak == 2  # two workers with four free slots each, never more than the cap
    limit = (await store.list_limits())[0]
    assert limit.running == 0 and limit.started_last_minute == 10


class RateLimited(Instant):
    """Every attempt is answered 429 with a week-long Retry-After."""

    async def run(self, job: Job) -> dict[str, Any]:
        raise JobFailure("rate_limited", "429 Too Many Requests", retry_after=timedelta(days=7))


async def test_a_week_long_retry_after_holds_the_profile_for_cooldown_max_only(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory
) -> None:
    worker = await worker_factory(kinds=[RateLimited()], worker_poll_interval=POLL, cooldown_max=timedelta(seconds=30))
    await wait_until_listening(worker)
    job = await job_factory(task_type="instant", model_profile="m")
    retried = await wait_for_outcome(store, job.id)
    assert retried.status == "pending" and retried.error_category == "rate_limited"
    (limit,) = await store.list_limits()
    assert limit.cooldown_until is not None
    held = limit.cooldown_until - retried.updated_at
    assert timedelta(seconds=29) < held <= timedelta(seconds=30), held  # not the week the provider asked for
