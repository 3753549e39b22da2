"""Running claimed jobs: each job's work runs in its own task, watched by a supervisor task that
keeps the lease while the work runs and then hands the outcome to the completer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiservice import metrics
from aiservice.jobs import Job
from aiservice.worker.completer import Completer
from aiservice.worker.failure import JobFailure
from aiservice.worker.flight import Flights, InFlight
from aiservice.worker.kinds import Kind
from aiservice.worker.leases import LeaseKeeper

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(
        self,
        flights: Flights,
        leases: LeaseKeeper,
        completer: Completer,
        *,
        worker_id: str,
        freed: Callable[[], None],
    ) -> None:
        self.flights = flights
        self.leases = leases
        self.completer = completer
        self.worker_id = worker_id
        self._freed = freed
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, job: Job, kind: Kind) -> None:
        work = asyncio.create_task(kind.run(job), name=f"aiservice-job-{job.id}")
        flight = InFlight(job=job, kind=kind, work=work)
        log.info(
            "job %d (%s/%s) attempt %d started",
            job.id,
            job.task_type,
            job.model_profile,
            job.attempts,
            extra=flight.log_context(self.worker_id),
        )
        if job.started_at is not None:
            metrics.WAIT_SECONDS.labels(job.task_type).observe((job.started_at - job.created_at).total_seconds())
        self.flights.add(flight)
        task = asyncio.create_task(self._supervise(flight), name=f"aiservice-supervise-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _supervise(self, flight: InFlight) -> None:
        lease = asyncio.create_task(self.leases.keep(flight))
        try:
            await asyncio.wait([flight.work])
            lease.cancel()
            await self._settle(flight)
        except Exception:
            log.exception("job %d: could not record its outcome; its lease will expire", flight.job.id)
        finally:
            lease.cancel()
            self.flights.remove(flight)
            self._freed()

    async def _settle(self, flight: InFlight) -> None:
        work = flight.work
        # A kind that swallowed its cancellation still ends here as stopped.
        if work.cancelled() or flight.stop_reason is not None:
            if flight.stop_reason == "lease_lost":
                self.flights.counts.aborted += 1
            else:
                await self.completer.release(flight)
            return
        exc = work.exception()
        if exc is None:
            await self.completer.complete(flight, work.result())
        else:
            await self.completer.fail(flight, self._failure(flight, exc))

    def _failure(self, flight: InFlight, exc: BaseException) -> JobFailure:
        if isinstance(exc, JobFailure):
            return exc
        name = flight.kind.name
        log.error("job %d: the %s worker raised", flight.job.id, name, exc_info=exc)
        # The exception text may hold anything (URLs, headers): the stored message names only its type.
        return JobFailure("worker_error", f"unexpected {type(exc).__name__} in the {name} worker; see its log")

    def stop_all(self, reason: str) -> None:
        for flight in self.flights:
            flight.stop(reason)

    async def join(self) -> None:
        """Until every supervised job has ended and its outcome is stored."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))
