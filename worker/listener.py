"""The wake-up path: LISTEN on the job channel, reconnecting with backoff when the connection drops.

Notifications are only a hint (see docs/adr/0003-notifications.md): the runner polls anyway, so
while this listener is down jobs are still picked up, one poll interval later."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiservice.db.jobs import JobEvents
from aiservice.events import wait_event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pending:
    """Jobs of this kind can be claimed now, or at ``run_at``."""

    task_type: str | None  # None: any (a limit on a whole profile or owner changed)
    model_profile: str | None
    run_at: datetime | None


@dataclass(frozen=True)
class Abort:
    """A running job was cancelled or reset by someone else; its worker should stop it."""

    id: int
    worker_id: str | None
    status: str


Event = Pending | Abort


def _optional(value: Any) -> str | None:
    return None if value is None else str(value)


def parse_event(payload: dict[str, Any]) -> Event | None:
    try:
        if payload.get("event") == "pending":
            run_at = payload.get("run_at")
            return Pending(
                task_type=_optional(payload["task_type"]),
                model_profile=_optional(payload["model_profile"]),
                run_at=datetime.fromisoformat(run_at) if run_at else None,
            )
        if payload.get("event") == "abort":
            worker_id = payload.get("worker_id")
            return Abort(
                id=int(payload["id"]),
                worker_id=None if worker_id is None else str(worker_id),
                status=str(payload.get("status")),
            )
    except (KeyError, TypeError, ValueError):
        log.warning("ignoring a malformed notification: %.200s", payload)
    return None


class Listener:
    """LISTEN on ``dsn``, which must give a session of its own (DATABASE_LISTEN_URL behind a
    transaction-mode pgbouncer: PostgreSQL itself, or a session-mode pool)."""

    def __init__(
        self,
        dsn: str,
        on_event: Callable[[Event], None],
        on_connected: Callable[[], None],
        *,
        application_name: str = "aiservice-listener",
        check_interval: float = 10.0,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self._dsn = dsn
        self._application_name = application_name
        self._on_event = on_event
        self._on_connected = on_connected
        self._check_interval = check_interval
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._lost = asyncio.Event()
        self.state = "connecting"
        self.connected_since: datetime | None = None
        self.reconnects = 0
        self.last_error: str | None = None
        self.notifications = 0

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "connected_since": self.connected_since,
            "reconnects": self.reconnects,
            "notifications": self.notifications,
            "last_error": self.last_error,
        }

    async def run(self) -> None:
        """Stay connected until cancelled."""
        try:
            await self._run()
        finally:
            self.state = "stopped"

    async def _run(self) -> None:
        delay = self._min_backoff
        ever_connected = False
        while True:
            self._lost.clear()
            try:
                events = await JobEvents.open(
                    self._dsn, self._dispatch, self._lost.set, application_name=self._application_name
                )
            except Exception as exc:
                self.state = "disconnected"
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("listener cannot connect (%s); next try in %.1fs", self.last_error, delay)
                # Jitter keeps a fleet of workers from reconnecting in step after a restart.
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self._max_backoff)
                continue
            delay = self._min_backoff
            if ever_connected:
                self.reconnects += 1
                log.info("listener reconnected")
            ever_connected = True
            self.state = "connected"
            self.connected_since = datetime.now(UTC)
            try:
                # Notifications sent while we were away are lost: look for work now.
                self._on_connected()
                await self._watch(events)
            finally:
                self.state = "disconnected"
                self.connected_since = None
                await events.close()
            log.warning("listener connection lost (%s); reconnecting in %.1fs", self.last_error or "closed", delay)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))

    async def _watch(self, events: JobEvents) -> None:
        """Return when the connection is gone: closed under us, or silent on a check."""
        while True:
            if await wait_event(self._lost, self._check_interval):
                self.last_error = "connection closed"
                return
            try:
                await events.check(within=min(5.0, self._check_interval))
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                return

    def _dispatch(self, payload: dict[str, Any]) -> None:
        self.notifications += 1
        event = parse_event(payload)
        if event is not None:
            self._on_event(event)
