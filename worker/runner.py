"""The claim loop: claim only into free slots, keep each lease alive, record how each attempt ended.

Wake-ups come from the listener (a notification, or a timer for a job due later) and from the
poll interval; either way the claim itself is the SQL function claim_jobs, so a spurious wake-up
costs one empty claim and a lost one costs at most one interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from aiservice import errors, metrics
from aiservice.db.jobs import JobStore
from aiservice.jobs import Job, JobStatus
from worker.failure import JobFailure
from worker.kinds import Kind, serves
from worker.listener import Abort, Event, Pending

log = logging.getLogger(__name__)

T = TypeVar("T")

# Clock skew between worker and database: a timer fires this much after run_at.
_TIMER_MARGIN = 0.05
# Jobs due later are woken by timers up to this many distinct due times; beyond, polling finds them.
_MAX_TIMERS = 256


@dataclass
class InFlight:
    job: Job
    kind: Kind
    work: asyncio.Task[dict[str, Any]]
    started: float = field(default_factory=time.monotonic)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Why the runner stopped the work: "lease_lost" (cancelled, reset or expired elsewhere) or "shutdown".
    stop_reason: str | None = None


@dataclass
class Counts:
    claimed: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    aborted: int = 0
    released: int = 0
    discarded: int = 0


class Runner:
    def __init__(
        self,
        store: JobStore,
        kinds: Sequence[Kind],
        *,
        worker_id: str,
        claim_limit: int,
        lease_timeout: timedelta,
        poll_interval: timedelta,
        heartbeat_interval: timedelta | None = None,
    ) -> None:
        self.store = store
        self.kinds = list(kinds)
        self.worker_id = worker_id
        self.claim_limit = claim_limit
        metrics.WORKER_SLOTS.labels("total").set(claim_limit)
        self.lease_timeout = lease_timeout
        self.poll_interval = poll_interval.total_seconds()
        # A third of the lease: two heartbeats may fail before the lease runs out.
        self.heartbeat_interval = (heartbeat_interval or lease_timeout / 3).total_seconds()
        self.counts = Counts()
        self.last_claim_at: datetime | None = None
        self.last_poll_at: datetime | None = None
        self._inflight: dict[int, InFlight] = {}
        self._supervisors: set[asyncio.Task[None]] = set()
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._timers: dict[float, asyncio.TimerHandle] = {}
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()
        self._stopping = False
        self._backlog = False
        self._rotation = 0
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._claim_loop(), name="aiservice-claim-loop")

    def wake(self) -> None:
        if not self._stopping:
            self._wake.set()

    def on_event(self, event: Event) -> None:
        if isinstance(event, Pending):
            if not any(serves(k, event.task_type, event.model_profile) for k in self.kinds):
                return
            if event.run_at is None:
                self.wake()
            else:
                self._wake_at(event.run_at)
        elif isinstance(event, Abort):
            flight = self._inflight.get(event.id)
            if flight is None or event.worker_id not in (None, self.worker_id):
                return
            # The notification may predate our own claim of the same job (reset, then claimed
            # again by us): the lease, not the notification, decides whether to stop.
            self._spawn(self._renew(flight))

    def _wake_at(self, run_at: datetime) -> None:
        delay = (run_at - datetime.now(UTC)).total_seconds() + _TIMER_MARGIN
        if delay <= _TIMER_MARGIN:
            self.wake()
            return
        key = round(run_at.timestamp(), 2)
        if self._stopping or key in self._timers or len(self._timers) >= _MAX_TIMERS:
            return
        self._timers[key] = asyncio.get_running_loop().call_later(delay, self._timer_fired, key)

    def _timer_fired(self, key: float) -> None:
        self._timers.pop(key, None)
        self.wake()

    async def _claim_loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                await self._claim()
            except Exception:
                log.exception("claim failed")
            if self._stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def _claim(self) -> None:
        free = self.claim_limit - len(self._inflight)
        self._backlog = free <= 0
        if free <= 0:
            return
        self.last_poll_at = datetime.now(UTC)
        # Rotating the order keeps one busy kind of job from starving the others.
        first = self._rotation % len(self.kinds)
        self._rotation += 1
        for kind in self.kinds[first:] + self.kinds[:first]:
            if free <= 0 or self._stopping:
                break
            try:
                jobs = await self.store.claim_jobs(
                    self.worker_id,
                    free,
                    lease_timeout=self.lease_timeout,
                    task_types=list(kind.task_types),
                    model_profiles=list(kind.model_profiles),
                )
            except errors.DatabaseUnavailable:
                log.warning("claim skipped: PostgreSQL unavailable")
                return
            for job in jobs:
                self._start(job, kind)
            if jobs:
                self.last_claim_at = datetime.now(UTC)
                self.counts.claimed += len(jobs)
            free -= len(jobs)
        # Every slot filled: there may be more waiting, so claim again as soon as one frees up.
        self._backlog = free <= 0

    def _start(self, job: Job, kind: Kind) -> None:
        log.info(
            "job %d (%s/%s) attempt %d started",
            job.id,
            job.task_type,
            job.model_profile,
            job.attempts,
            extra=self._context(job),
        )
        if job.started_at is not None:
            metrics.WAIT_SECONDS.labels(job.task_type).observe((job.started_at - job.created_at).total_seconds())
        work = asyncio.create_task(kind.run(job), name=f"aiservice-job-{job.id}")
        flight = InFlight(job=job, kind=kind, work=work)
        self._inflight[job.id] = flight
        metrics.WORKER_SLOTS.labels("busy").set(len(self._inflight))
        supervisor = asyncio.create_task(self._supervise(flight), name=f"aiservice-supervise-{job.id}")
        self._supervisors.add(supervisor)
        supervisor.add_done_callback(self._supervisors.discard)

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> None:
        task = asyncio.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _supervise(self, flight: InFlight) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(flight))
        try:
            await asyncio.wait([flight.work])
            heartbeat.cancel()
            await self._settle(flight)
        except Exception:
            log.exception("job %d: could not record its outcome; its lease will expire", flight.job.id)
        finally:
            heartbeat.cancel()
            self._inflight.pop(flight.job.id, None)
            metrics.WORKER_SLOTS.labels("busy").set(len(self._inflight))
            if self._backlog:
                self.wake()

    async def _heartbeat(self, flight: InFlight) -> None:
        while await self._renew(flight, wait=self.heartbeat_interval):
            pass

    async def _renew(self, flight: InFlight, *, wait: float = 0.0) -> bool:
        """Extend the lease; on a fencing refusal stop the work. False once there is nothing to renew."""
        if wait:
            await asyncio.sleep(wait)
        if flight.work.done():
            return False
        job = flight.job
        try:
            await self.store.heartbeat_job(
                job.id, self.worker_id, lease_timeout=self.lease_timeout, lease_token=job.lease_token
            )
        except (errors.LeaseLost, errors.JobNotFound):
            log.warning("job %d: lease lost (cancelled, reset or expired elsewhere); stopping it", job.id)
            self._stop(flight, "lease_lost")
            return False
        except errors.DatabaseUnavailable:
            log.warning("job %d: heartbeat failed, PostgreSQL unavailable; trying again", job.id)
        except Exception:
            log.exception("job %d: heartbeat failed", job.id)
        return True

    def _stop(self, flight: InFlight, reason: str) -> None:
        # Finished work keeps its outcome: a shutdown must not turn a result into a release.
        if flight.work.done():
            return
        if flight.stop_reason is None:
            flight.stop_reason = reason
        flight.work.cancel()

    async def _settle(self, flight: InFlight) -> None:
        job, work = flight.job, flight.work
        # A kind that swallowed its cancellation still ends here as stopped.
        if work.cancelled() or flight.stop_reason is not None:
            if flight.stop_reason == "lease_lost":
                self.counts.aborted += 1
            else:
                await self._release(job)
            return
        exc = work.exception()
        try:
            if exc is None:
                await self._complete(job, work.result())
            else:
                await self._fail(flight, exc)
        except (errors.LeaseLost, errors.JobNotFound):
            self.counts.discarded += 1
            log.warning("job %d: lease lost before the outcome was stored; result discarded", job.id)

    async def _complete(self, job: Job, result: dict[str, Any]) -> None:
        try:
            await self._retrying(
                lambda: self.store.complete_job(job.id, self.worker_id, result, lease_token=job.lease_token)
            )
        except errors.InvalidArgument as exc:
            # A result PostgreSQL cannot store (NUL characters, NaN) is the provider's output at fault.
            await self._record_failure(job, JobFailure("output_invalid", exc.message, retryable=False))
            return
        self.counts.completed += 1
        elapsed = self._observe(job, "completed", "")
        log.info("job %d completed", job.id, extra=self._context(job) | {"status": "completed", "duration_ms": elapsed})

    async def _fail(self, flight: InFlight, exc: BaseException) -> None:
        if not isinstance(exc, JobFailure):
            log.error("job %d: the %s worker raised", flight.job.id, flight.kind.name, exc_info=exc)
            # The exception text may hold anything (URLs, headers): the stored message names only its type.
            exc = JobFailure(
                "worker_error",
                f"unexpected {type(exc).__name__} in the {flight.kind.name} worker; see its log",
                retryable=False,
            )
        await self._record_failure(flight.job, exc)

    async def _record_failure(self, job: Job, fail: JobFailure) -> None:
        updated = await self._retrying(
            lambda: self.store.fail_job(
                job.id,
                self.worker_id,
                fail.category,
                fail.message,
                retryable=fail.retryable,
                retry_after=fail.retry_after,
                lease_token=job.lease_token,
            )
        )
        status = "retried" if updated.status == JobStatus.PENDING else "failed"
        elapsed = self._observe(job, status, fail.category)
        context = self._context(job) | {"status": status, "error_category": fail.category, "duration_ms": elapsed}
        if status == "retried":
            self.counts.retried += 1
            log.info("job %d: %s; retry due at %s", job.id, fail.category, updated.run_at.isoformat(), extra=context)
        else:
            self.counts.failed += 1
            log.info("job %d failed: %s", job.id, fail.category, extra=context)

    def _context(self, job: Job) -> dict[str, Any]:
        """Log fields of a job (never its input or result)."""
        return {
            "job_id": job.id,
            "task_type": job.task_type,
            "model_profile": job.model_profile,
            "worker_id": self.worker_id,
            "attempt": job.attempts,
        }

    def _observe(self, job: Job, status: str, category: str) -> float | None:
        """Count an attempt's outcome; returns its run time in ms while the job is in flight."""
        metrics.JOBS_FINISHED.labels(job.task_type, job.model_profile, status, category).inc()
        flight = self._inflight.get(job.id)
        if flight is None:
            return None
        if category:
            metrics.PROVIDER_ERRORS.labels(flight.kind.name, category).inc()
        elapsed = time.monotonic() - flight.started
        metrics.RUN_SECONDS.labels(job.task_type, status).observe(elapsed)
        return round(elapsed * 1000, 1)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """Ride out a short PostgreSQL outage when storing an outcome; give up after one lease."""
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

    async def _release(self, job: Job) -> None:
        try:
            await self.store.release_job(job.id, self.worker_id, lease_token=job.lease_token)
        except (errors.LeaseLost, errors.JobNotFound):
            return
        except errors.DatabaseUnavailable:
            log.warning("job %d not released: PostgreSQL unavailable; it returns when its lease expires", job.id)
            return
        self.counts.released += 1
        log.info("job %d released for another worker", job.id)

    def hurry(self) -> None:
        """End the shutdown grace period now (a second SIGTERM/SIGINT)."""
        self._hurry.set()

    async def shutdown(self, grace: float) -> None:
        """Stop claiming, give jobs in flight ``grace`` seconds, then hand the rest back."""
        self._stopping = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._wake.set()
        if self._loop_task is not None:
            # Not cancelled mid-claim unless PostgreSQL hangs: a claim that commits unseen would
            # hold its jobs until their leases expire.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._loop_task), grace)
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._inflight:
            log.info("waiting up to %gs for %d jobs in flight", grace, len(self._inflight))
            await self._drain(grace)
        for flight in list(self._inflight.values()):
            self._stop(flight, "shutdown")
        while self._supervisors:
            await asyncio.wait(set(self._supervisors))
        for task in list(self._side_tasks):
            task.cancel()
        await asyncio.gather(*self._side_tasks, return_exceptions=True)

    async def _drain(self, grace: float) -> None:
        async def all_done() -> None:
            while self._supervisors:
                await asyncio.wait(set(self._supervisors))

        waiters = {asyncio.create_task(all_done()), asyncio.create_task(self._hurry.wait())}
        try:
            await asyncio.wait(waiters, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "in_flight": [
                {
                    "id": f.job.id,
                    "task_type": f.job.task_type,
                    "model_profile": f.job.model_profile,
                    "attempt": f.job.attempts,
                    "started_at": f.started_at,
                    "age_seconds": round(now - f.started, 3),
                }
                for f in sorted(self._inflight.values(), key=lambda f: f.job.id)
            ],
            "counts": asdict(self.counts),
            "last_claim_at": self.last_claim_at,
            "last_poll_at": self.last_poll_at,
            "stopping": self._stopping,
        }
