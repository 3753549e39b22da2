"""Outcomes of jobs that finish together: one complete_jobs call for all their results, and each
job's own outcome (completed, discarded by fencing, or failed when PostgreSQL refuses its result)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any
from uuid import UUID

from conftest import JobFactory
from stubs import wait_for, wait_for_status

from aiservice import metrics
from aiservice.db.store import JobStore
from aiservice.jobs import Job
from aiservice.worker.runner import Runner


class Gate:
    """A job kind whose jobs all wait for one gate, so that they finish at the same moment."""

    name = "gate"
    task_types: tuple[str, ...] = ("gate",)
    model_profiles: tuple[str, ...] = ("m",)

    def __init__(self) -> None:
        self.running = 0
        self.open = asyncio.Event()

    async def run(self, job: Job) -> dict[str, Any]:
        self.running += 1
        await self.open.wait()
        # PostgreSQL cannot store NUL in jsonb: the input cannot carry it, so the kind makes it.
        return {"text": "nul \x00"} if job.input.get("poison") else {"done": job.id}

    async def close(self) -> None:
        return None


class SpyStore(JobStore):
    """The real store, recording the job ids of each complete_jobs call."""

    def __init__(self, store: JobStore) -> None:
        super().__init__(store.pool)
        self.batches: list[list[int]] = []

    async def complete_jobs(
        self, worker_id: str, completions: Iterable[tuple[int, UUID | None, dict[str, Any]]]
    ) -> dict[int, str]:
        completions = list(completions)
        self.batches.append([job_id for job_id, _, _ in completions])
        return await super().complete_jobs(worker_id, completions)


@asynccontextmanager
async def gated(store: JobStore, jobs: list[Job]) -> AsyncIterator[tuple[Runner, Gate, SpyStore]]:
    """A runner claiming ``jobs`` with the gate kind; the gate opens once all of them run."""
    gate, spy = Gate(), SpyStore(store)
    runner = Runner(
        spy,
        [gate],
        worker_id="gated",
        claim_limit=len(jobs),
        lease_timeout=timedelta(seconds=30),
        poll_interval=timedelta(milliseconds=100),
    )
    runner.start()
    try:

        async def all_running() -> bool:
            return gate.running == len(jobs)

        await wait_for(all_running, what="every job to run")
        yield runner, gate, spy
    finally:
        await runner.shutdown(grace=5)


def finished(status: str, category: str = "") -> float:
    return float(metrics.JOBS_FINISHED.labels("gate", "m", status, category)._value.get())


async def test_jobs_that_finish_together_are_completed_in_one_complete_jobs_call(
    store: JobStore, job_factory: JobFactory
) -> None:
    jobs = [await job_factory(task_type="gate", model_profile="m") for _ in range(5)]
    before = finished("completed")
    async with gated(store, jobs) as (runner, gate, spy):
        gate.open.set()

        async def settled() -> bool:
            return runner.in_flight == 0

        await wait_for(settled, what="the jobs to settle")

    assert spy.batches == [[j.id for j in jobs]]
    for job in jobs:
        done = await store.get_job(job.id)
        assert (done.status, done.result) == ("completed", {"done": job.id})
    assert runner.counts.completed == 5 and runner.counts.discarded == 0
    assert finished("completed") - before == 5


async def test_a_result_refused_by_fencing_is_discarded_and_the_others_complete(
    store: JobStore, job_factory: JobFactory
) -> None:
    jobs = [await job_factory(task_type="gate", model_profile="m") for _ in range(3)]
    async with gated(store, jobs) as (runner, gate, spy):
        # No listener and heartbeats far apart: the runner learns of the cancel only from complete_jobs.
        await store.cancel_job(jobs[1].id)
        gate.open.set()

        async def settled() -> bool:
            return runner.in_flight == 0

        await wait_for(settled, what="the jobs to settle")

    assert spy.batches == [[j.id for j in jobs]]
    assert runner.counts.completed == 2 and runner.counts.discarded == 1
    cancelled = await store.get_job(jobs[1].id)
    assert (cancelled.status, cancelled.result) == ("cancelled", None)
    for job in (jobs[0], jobs[2]):
        assert (await store.get_job(job.id)).status == "completed"


async def test_a_result_postgresql_cannot_store_fails_that_job_alone(store: JobStore, job_factory: JobFactory) -> None:
    jobs = [await job_factory(task_type="gate", model_profile="m", input={"poison": i == 1}) for i in range(3)]
    async with gated(store, jobs) as (runner, gate, spy):
        gate.open.set()
        poisoned = await wait_for_status(store, jobs[1].id, "failed")
        for job in (jobs[0], jobs[2]):
            await wait_for_status(store, job.id, "completed")

    ids = [j.id for j in jobs]
    # The refused call, then each result alone to find the one at fault.
    assert spy.batches == [ids, *([i] for i in ids)]
    assert (poisoned.error_category, poisoned.result) == ("output_invalid", None)
    assert runner.counts.completed == 2 and runner.counts.failed == 1
