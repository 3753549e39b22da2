"""Lease keeping: each running job's lease is renewed every third of it, so two heartbeats may fail
before it runs out. A fencing refusal (the job was cancelled, reset or taken over) stops the job."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from aiservice import errors
from aiservice.db.store import JobStore
from aiservice.worker.flight import InFlight

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(
        self, store: JobStore, *, worker_id: str, lease_timeout: timedelta, interval: timedelta | None = None
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.lease_timeout = lease_timeout
        self.interval = (interval or lease_timeout / 3).total_seconds()
        self._checks: set[asyncio.Task[bool]] = set()

    async def keep(self, flight: InFlight) -> None:
        """Renew the lease until the work ends or the lease is lost (then the work is stopped)."""
        while True:
            await asyncio.sleep(self.interval)
            if not await self.renew(flight):
                return

    def check_soon(self, flight: InFlight) -> None:
        """Renew now, in the background, after an abort notification. The notification may predate
        our own claim of the same job (reset, then claimed again by us): the lease decides."""
        task = asyncio.create_task(self.renew(flight))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def renew(self, flight: InFlight) -> bool:
        """Extend the lease; on a fencing refusal stop the work. False once there is nothing to renew."""
        if flight.work.done():
            return False
        job = flight.job
        try:
            await self.store.heartbeat_job(
                job.id, self.worker_id, lease_timeout=self.lease_timeout, lease_token=job.lease_token
            )
        except (errors.LeaseLost, errors.NotFound):
            log.warning("job %d: lease lost (cancelled, reset or expired elsewhere); stopping it", job.id)
            flight.stop("lease_lost")
            return False
        except errors.DatabaseUnavailable:
            log.warning("job %d: heartbeat failed, PostgreSQL unavailable; trying again", job.id)
        except Exception:
            log.exception("job %d: heartbeat failed", job.id)
        return True

    async def close(self) -> None:
        for task in list(self._checks):
            task.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)
