"""Claiming: only into free slots, one claim_jobs call per job kind, whenever the wake-up says so.
Each kind claims at most what both the worker and the kind have free (Flights.free).

Wake-ups come from the listener (a notification, or a timer for a job due later) and from the
poll interval; either way the claim itself is the SQL function claim_jobs, so a spurious wake-up
costs one empty claim and a lost one costs at most one interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from aiservice import errors
from aiservice.db.store import JobStore
from aiservice.jobs import Job
from aiservice.worker.flight import Flights
from aiservice.worker.kinds import Kind, matches
from aiservice.worker.notifications import Pending
from aiservice.worker.wakeup import Wakeup

log = logging.getLogger(__name__)


class Claimer:
    def __init__(
        self,
        store: JobStore,
        kinds: Sequence[Kind],
        flights: Flights,
        start: Callable[[Job, Kind], None],
        *,
        worker_id: str,
        lease_timeout: timedelta,
        poll_interval: timedelta,
        max_dependency_bytes: int | None = None,
    ) -> None:
        self.store = store
        self.kinds = list(kinds)
        self.flights = flights
        self._start = start
        self.worker_id = worker_id
        self.lease_timeout = lease_timeout
        self.poll_interval = poll_interval.total_seconds()
        self.max_dependency_bytes = max_dependency_bytes
        self.wakeup = Wakeup()
        self.last_claim_at: datetime | None = None
        self.last_poll_at: datetime | None = None
        self.stopping = False
        self._backlog = False
        self._rotation = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="aiservice-claim-loop")

    def on_pending(self, event: Pending) -> None:
        if not any(matches(k, event.task_type, event.model_profile) for k in self.kinds):
            return
        if event.run_at is None:
            self.wakeup.now()
        else:
            self.wakeup.at(event.run_at)

    def slot_freed(self) -> None:
        # The last claim filled the slots of some kind, so more may be waiting: claim again now.
        if self._backlog:
            self.wakeup.now()

    async def _loop(self) -> None:
        while not self.stopping:
            # A database not (or no longer) at this code's schema is waited out here, logged by the
            # schema gate once a minute, instead of failing every claim.
            await self.store.schema_ready()
            self.wakeup.clear()
            try:
                await self._claim()
            except errors.SchemaMismatch:
                pass  # the gate has logged it; the next round waits in schema_ready()
            except Exception:
                log.exception("claim failed")
            if self.stopping:
                return
            await self.wakeup.wait(self.poll_interval)

    async def _claim(self) -> None:
        self._backlog = self.flights.free() <= 0
        if self._backlog:
            return
        self.last_poll_at = datetime.now(UTC)
        # Rotating the order keeps one busy kind of job from starving the others.
        first = self._rotation % len(self.kinds)
        self._rotation += 1
        for kind in self.kinds[first:] + self.kinds[:first]:
            if self.stopping:
                break
            free = self.flights.free(kind)
            if free <= 0:
                self._backlog = True
                continue
            try:
                jobs = await self.store.claim_jobs(
                    self.worker_id,
                    free,
                    lease_timeout=self.lease_timeout,
                    task_types=list(kind.task_types),
                    model_profiles=list(kind.model_profiles),
                    max_dependency_bytes=self.max_dependency_bytes,
                )
            except errors.SchemaMismatch:
                raise
            except errors.DatabaseUnavailable:
                log.warning("claim skipped: PostgreSQL unavailable")
                return
            for job in jobs:
                self._start(job, kind)
            if jobs:
                self.last_claim_at = datetime.now(UTC)
                self.flights.counts.claimed += len(jobs)
            self._backlog = self._backlog or len(jobs) >= free

    async def stop(self, grace: float) -> None:
        """Claim no more. The claim in progress may finish within ``grace``: a claim cancelled
        mid-flight that commits unseen would hold its jobs until their leases expire."""
        self.stopping = True
        self.wakeup.stop()
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
