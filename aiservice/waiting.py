"""Waiting for jobs to finish: one LISTEN connection per API process fans out to every waiter.

Notifications on aiservice_finished wake waiters at once; a re-check every second of the jobs
still awaited (one indexed query for all of them) covers notifications lost while the connection
was down, so 1,000 waiting requests hold one connection, not 1,000."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiservice import errors
from aiservice.db.jobs import FINISHED_CHANNEL, JobEvents, JobStore

log = logging.getLogger(__name__)

Mode = Literal["any", "all"]


@dataclass(eq=False)
class Waiter:
    remaining: set[int]
    mode: Mode
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def finished(self, job_id: int) -> None:
        self.remaining.discard(job_id)
        if self.mode == "any" or not self.remaining:
            self.done.set()


class Waiters:
    def __init__(
        self, store: JobStore, dsn: str, *, recheck: float = 1.0, on_finished: Callable[[], None] | None = None
    ) -> None:
        self.store = store
        self.dsn = dsn
        self.recheck = recheck
        self.on_finished = on_finished  # the webhook sender wants to know too
        self._by_job: dict[int, set[Waiter]] = {}
        self.connected = False

    @property
    def waiting(self) -> int:
        return len({w for waiters in self._by_job.values() for w in waiters})

    async def wait(self, ids: list[int], mode: Mode, seconds: float) -> None:
        """Return when any (or all) of ``ids`` finished, or after ``seconds``."""
        waiter = Waiter(set(ids), mode)
        for job_id in ids:
            self._by_job.setdefault(job_id, set()).add(waiter)
        try:
            # Registered first, then read: a job finishing in between is not missed.
            for job in await self.store.finished(ids):
                waiter.finished(job.id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.done.wait(), seconds)
        finally:
            for job_id in ids:
                waiters = self._by_job.get(job_id)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._by_job[job_id]

    def _finished(self, job_id: int) -> None:
        for waiter in list(self._by_job.get(job_id, ())):
            waiter.finished(job_id)

    def _notified(self, payload: dict[str, Any]) -> None:
        for job in payload.get("jobs") or ():
            if isinstance(job, dict) and isinstance(job.get("id"), int):
                self._finished(job["id"])
        if self.on_finished is not None:
            self.on_finished()

    async def _recheck(self) -> None:
        ids = list(self._by_job)
        for start in range(0, len(ids), 1000):
            for job in await self.store.finished(ids[start : start + 1000]):
                self._finished(job.id)

    async def run(self) -> None:
        """Listen, and re-check every second; reconnect with a jittered backoff after a loss."""
        delay = 0.5
        while True:
            lost = asyncio.Event()
            events: JobEvents | None = None
            try:
                events = await JobEvents.open(
                    self.dsn, self._notified, lost.set, application_name="aiservice-waiters", channel=FINISHED_CHANNEL
                )
                self.connected, delay = True, 0.5
                await self._recheck()  # whatever finished while we were away
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), self.recheck)
                    await self._recheck()
            except errors.DatabaseUnavailable as exc:
                log.warning("waiters: PostgreSQL unavailable (%s); retrying in %.1fs", exc, delay)
            except Exception:
                log.exception("waiters: unexpected error; retrying in %.1fs", delay)
            finally:
                self.connected = False
                if events is not None:
                    await events.close()
            # Polling stands in while the listener is down.
            with contextlib.suppress(Exception):
                await self._recheck()
            await asyncio.sleep(delay * (0.75 + random.random() / 2))
            delay = min(delay * 2, 5.0)
