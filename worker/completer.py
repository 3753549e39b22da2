"""Storing how each attempt ended: results in batches (complete_jobs), failures one by one
(fail_job), jobs handed back on shutdown (release_job).

Results that are ready at the same moment go back in one complete_jobs call: each job queues its
result and waits, and a single flush task sends everything queued by the time it runs. While a
call is under way, results queue for the next one, so a burst of results costs one round trip and
one commit and a lone result waits for nothing.

Fencing is per job: an outcome that the job's lease no longer covers is discarded and logged."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from aiservice import errors, rules
from aiservice.db.store import JobStore
from aiservice.jobs import JobStatus
from aiservice.worker.failure import JobFailure
from aiservice.worker.flight import Counts, InFlight

log = logging.getLogger(__name__)

T = TypeVar("T")

# The most jobs aiservice.complete_jobs takes in one call.
MAX_BATCH = rules.COMPLETE_BATCH_MAX


@dataclass(frozen=True)
class _Result:
    flight: InFlight
    result: dict[str, Any]
    # complete_jobs' outcome for the job: "completed", "lease_lost" or "not_found".
    outcome: asyncio.Future[str]


class Completer:
    def __init__(
        self, store: JobStore, counts: Counts, *, worker_id: str, lease_timeout: timedelta, hurry: asyncio.Event
    ) -> None:
        self.store = store
        self.counts = counts
        self.worker_id = worker_id
        self.lease_timeout = lease_timeout
        self._hurry = hurry
        self._queue: list[_Result] = []
        self._flush: asyncio.Task[None] | None = None

    async def complete(self, flight: InFlight, result: dict[str, Any]) -> None:
        job = flight.job
        try:
            outcome = await self._queued(flight, result)
        except errors.InvalidArgument as exc:
            # A result PostgreSQL cannot store (NUL characters, NaN) is the provider's output at fault.
            await self.fail(flight, JobFailure("output_invalid", exc.message))
            return
        if outcome != "completed":
            self._discarded(flight)
            return
        self.counts.completed += 1
        elapsed = flight.observe("completed")
        context = flight.log_context(self.worker_id) | {"status": "completed", "duration_ms": elapsed}
        log.info("job %d completed", job.id, extra=context)

    async def _queued(self, flight: InFlight, result: dict[str, Any]) -> str:
        """Queue the result for the next complete_jobs call; its outcome for this job."""
        queued = _Result(flight, result, asyncio.get_running_loop().create_future())
        self._queue.append(queued)
        if self._flush is None or self._flush.done():
            # Started now, it first runs after every job that finished with this one has queued.
            self._flush = asyncio.create_task(self._flush_queue(), name="aiservice-complete-jobs")
        return await queued.outcome

    async def _flush_queue(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            try:
                await self._store(batch)
            finally:
                # Whatever went wrong, no job is left waiting for its outcome.
                for queued in batch:
                    _settle(queued, RuntimeError("complete_jobs did not report this job"))

    async def _store(self, batch: list[_Result]) -> None:
        completions = [(r.flight.job.id, r.flight.job.lease_token, r.result) for r in batch]
        try:
            outcomes = await self._retrying(lambda: self.store.complete_jobs(self.worker_id, completions))
        except errors.InvalidArgument as exc:
            if len(batch) == 1:
                _settle(batch[0], exc)
                return
            # One result that PostgreSQL refuses fails the whole call: store each alone to find it.
            for one in batch:
                await self._store([one])
            return
        except Exception as exc:
            for queued in batch:
                _settle(queued, exc)
            return
        for queued in batch:
            _settle(queued, outcomes[queued.flight.job.id])

    async def fail(self, flight: InFlight, failure: JobFailure) -> None:
        job = flight.job
        try:
            updated = await self._retrying(
                lambda: self.store.fail_job(
                    job.id,
                    self.worker_id,
                    failure.category,
                    failure.message,
                    retryable=failure.retryable,
                    retry_after=failure.retry_after,
                    lease_token=job.lease_token,
                )
            )
        except (errors.LeaseLost, errors.NotFound):
            self._discarded(flight)
            return
        status = "retried" if updated.status == JobStatus.PENDING else "failed"
        elapsed = flight.observe(status, failure.category)
        context = flight.log_context(self.worker_id) | {
            "status": status,
            "error_category": failure.category,
            "duration_ms": elapsed,
        }
        if status == "retried":
            self.counts.retried += 1
            due = updated.run_at.isoformat()
            log.info("job %d: %s; retry due at %s", job.id, failure.category, due, extra=context)
        else:
            self.counts.failed += 1
            log.info("job %d failed: %s", job.id, failure.category, extra=context)

    async def release(self, flight: InFlight) -> None:
        """Hand a job stopped by shutdown back for another worker (no attempt used)."""
        job = flight.job
        try:
            await self.store.release_job(job.id, self.worker_id, lease_token=job.lease_token)
        except (errors.LeaseLost, errors.NotFound):
            return
        except errors.DatabaseUnavailable:
            log.warning("job %d not released: PostgreSQL unavailable; it returns when its lease expires", job.id)
            return
        self.counts.released += 1
        log.info("job %d released for another worker", job.id)

    def _discarded(self, flight: InFlight) -> None:
        self.counts.discarded += 1
        log.warning(
            "job %d: lease lost before the outcome was stored; result discarded",
            flight.job.id,
            extra=flight.log_context(self.worker_id),
        )

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """Ride out a short PostgreSQL outage when storing an outcome; give up after one lease,
        or at once when shutdown is in a hurry."""
        deadline = time.monotonic() + self.lease_timeout.total_seconds()
        delay = 0.5
        while True:
            try:
                return await call()
            except errors.DatabaseUnavailable:
                if time.monotonic() + delay > deadline or self._hurry.is_set():
                    raise
                log.warning("PostgreSQL unavailable while storing an outcome; retrying in %.1fs", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def _settle(queued: _Result, outcome: str | Exception) -> None:
    if queued.outcome.done():  # the job's waiter is gone
        return
    if isinstance(outcome, Exception):
        queued.outcome.set_exception(outcome)
    else:
        queued.outcome.set_result(outcome)
