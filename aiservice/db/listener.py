"""LISTEN: a connection of its own on one NOTIFY channel, and the one loop that keeps it connected.

Notifications are only hints (docs/adr/0003-notifications.md): whoever listens also polls, so while
the connection is down work is still found, one poll later. The workers listen on CHANNEL (pending
jobs, aborts), the API's waiters on FINISHED_CHANNEL (finished jobs)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg

from aiservice.db.store import translate_errors
from aiservice.events import wait_event

log = logging.getLogger(__name__)

# The NOTIFY channel of the SQL API (payloads are described in README.md).
CHANNEL = "aiservice_jobs"
# Jobs (and batches) that finished: for callers waiting on results, apart from the workers' channel.
FINISHED_CHANNEL = "aiservice_finished"

# Before reconnecting: MIN_BACKOFF, doubled after each failed try up to MAX_BACKOFF, each wait
# jittered by ±20 % so that a fleet does not reconnect in step after a restart (docs/adr/0004).
MIN_BACKOFF = 0.5
MAX_BACKOFF = 30.0
# A round-trip this often finds a connection that died without telling us.
CHECK_INTERVAL = 10.0


class JobEvents:
    """A dedicated connection LISTENing on one channel; each payload is handed on as parsed JSON.

    A pooled connection cannot listen: the pool would hand it to other callers and reset it."""

    def __init__(self, conn: asyncpg.Connection[Any]) -> None:
        self._conn = conn

    @classmethod
    async def open(
        cls,
        dsn: str,
        on_event: Callable[[dict[str, Any]], None],
        on_lost: Callable[[], None],
        *,
        application_name: str = "aiservice-listener",
        connect_timeout: float = 10.0,
        channel: str = CHANNEL,
    ) -> JobEvents:
        malformed = 0

        def notified(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            nonlocal malformed
            try:
                event = json.loads(str(payload))
            except (ValueError, RecursionError):
                event = None
            if isinstance(event, dict):
                on_event(event)
                return
            # Any role allowed to NOTIFY can send anything: told once, then only at debug level.
            malformed += 1
            level = logging.WARNING if malformed == 1 else logging.DEBUG
            log.log(level, "ignoring a notification on %s that is not a JSON object: %.200s", channel, payload)

        async with translate_errors():
            conn: asyncpg.Connection[Any] = await asyncpg.connect(
                dsn, timeout=connect_timeout, server_settings={"application_name": application_name}
            )
        try:
            conn.add_termination_listener(lambda _conn: on_lost())
            async with translate_errors():
                await conn.add_listener(channel, notified)
        except BaseException:
            conn.terminate()
            raise
        return cls(conn)

    async def check(self, within: float) -> None:
        """Round-trip to the server, to find a connection that died without telling us."""
        async with translate_errors():
            await self._conn.fetchval("SELECT 1", timeout=within)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._conn.close(), timeout=2.0)
        except Exception:
            self._conn.terminate()


class Listener:
    """LISTEN on ``channel`` for as long as ``run`` runs, reconnecting with a jittered backoff.

    ``on_payload`` gets each notification's JSON object (an exception it raises is logged, never
    breaks the connection). ``on_connected`` runs after every connect: notifications sent while
    away are lost, so that is the time to look for work. ``dsn`` must give a session of its own
    (DATABASE_LISTEN_URL behind a transaction-mode pgbouncer: PostgreSQL itself, or a session-mode
    pool)."""

    def __init__(
        self,
        dsn: str,
        channel: str,
        on_payload: Callable[[dict[str, Any]], None],
        *,
        on_connected: Callable[[], None] | None = None,
        application_name: str = "aiservice-listener",
        check_interval: float = CHECK_INTERVAL,
        min_backoff: float = MIN_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        self._dsn = dsn
        self.channel = channel
        self._on_payload = on_payload
        self._on_connected = on_connected
        self._application_name = application_name
        self._check_interval = check_interval
        self._min_backoff = min_backoff
        self._max_backoff = max(max_backoff, min_backoff)
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
            self.connected_since = None

    async def _run(self) -> None:
        delay = self._min_backoff
        ever_connected = False
        while True:
            self._lost.clear()
            try:
                events = await JobEvents.open(
                    self._dsn,
                    self._dispatch,
                    self._lost.set,
                    application_name=self._application_name,
                    channel=self.channel,
                )
            except Exception as exc:
                self.state = "disconnected"
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("LISTEN %s: cannot connect (%s); next try in %.1fs", self.channel, self.last_error, delay)
                await _sleep_about(delay)
                delay = min(delay * 2, self._max_backoff)
                continue
            delay = self._min_backoff
            if ever_connected:
                self.reconnects += 1
                log.info("LISTEN %s: reconnected", self.channel)
            ever_connected = True
            self.state = "connected"
            self.connected_since = datetime.now(UTC)
            try:
                if self._on_connected is not None:
                    self._on_connected()
                await self._watch(events)
            finally:
                self.state = "disconnected"
                self.connected_since = None
                await events.close()
            log.warning("LISTEN %s: connection lost (%s); reconnecting in %.1fs", self.channel, self.last_error, delay)
            await _sleep_about(delay)

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
        try:
            self._on_payload(payload)
        except Exception:  # never let a notification break the listener
            log.exception("LISTEN %s: a notification could not be handled", self.channel)


async def _sleep_about(seconds: float) -> None:
    """Sleep ``seconds`` ± 20 %: jitter keeps a fleet from reconnecting in step."""
    await asyncio.sleep(seconds * random.uniform(0.8, 1.2))
