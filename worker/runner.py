"""The runner: the parts that work jobs, wired together for one worker.

- claimer.py    claims into free slots, one claim per job kind, when wakeup.py says so
- supervisor.py runs each claimed job in its own task and hands the outcome on
- leases.py     renews each lease every third of it; a fencing refusal stops the job
- completer.py  stores outcomes: results batched into complete_jobs, failures one by one
- shutdown.py   stops claiming, waits out the grace period, hands the rest back
- status.py     what /worker/status shows
- flight.py     the jobs in flight, shared by all of them, bounded in all and per kind

The job kinds (worker/kinds/) plug in: they turn a job's input into a result and know nothing
of claims, leases or outcomes."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from aiservice.db.store import JobStore
from aiservice.worker import status
from aiservice.worker.claimer import Claimer
from aiservice.worker.completer import Completer
from aiservice.worker.flight import Counts, Flights
from aiservice.worker.kinds import Kind
from aiservice.worker.leases import LeaseKeeper
from aiservice.worker.notifications import Abort, Event, Pending
from aiservice.worker.shutdown import shut_down
from aiservice.worker.supervisor import Supervisor


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
        kind_limits: Mapping[str, int] | None = None,
        max_dependency_bytes: int | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.flights = Flights(claim_limit, kind_limits)
        self._hurry = asyncio.Event()
        self.leases = LeaseKeeper(store, worker_id=worker_id, lease_timeout=lease_timeout, interval=heartbeat_interval)
        self.completer = Completer(
            store, self.flights.counts, worker_id=worker_id, lease_timeout=lease_timeout, hurry=self._hurry
        )
        self.supervisor = Supervisor(
            self.flights, self.leases, self.completer, worker_id=worker_id, freed=self._slot_freed
        )
        self.claimer = Claimer(
            store,
            kinds,
            self.flights,
            self.supervisor.start,
            worker_id=worker_id,
            lease_timeout=lease_timeout,
            poll_interval=poll_interval,
            max_dependency_bytes=max_dependency_bytes,
        )

    @property
    def in_flight(self) -> int:
        return len(self.flights)

    @property
    def counts(self) -> Counts:
        return self.flights.counts

    def start(self) -> None:
        self.claimer.start()

    def wake(self) -> None:
        self.claimer.wakeup.now()

    def on_event(self, event: Event) -> None:
        if isinstance(event, Pending):
            self.claimer.on_pending(event)
        elif isinstance(event, Abort) and event.worker_id in (None, self.worker_id):
            flight = self.flights.get(event.id)
            if flight is not None:
                self.leases.check_soon(flight)

    def _slot_freed(self) -> None:
        self.claimer.slot_freed()

    def hurry(self) -> None:
        """End the shutdown grace period now (a second SIGTERM/SIGINT)."""
        self._hurry.set()

    async def shutdown(self, grace: float) -> None:
        """Stop claiming, give jobs in flight ``grace`` seconds, then hand the rest back."""
        await shut_down(self.claimer, self.supervisor, self.leases, grace=grace, hurry=self._hurry)

    def status(self) -> dict[str, Any]:
        return status.work(self.flights, self.claimer)
