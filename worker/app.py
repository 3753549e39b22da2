"""The worker process: one pool, the built-in job kinds, the runner, the listener and the HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from aiservice import errors
from aiservice.db.listener import CHANNEL, Listener
from aiservice.db.migrate import migrate
from aiservice.db.pool import Pool, create_pool
from aiservice.db.schema import SchemaGate
from aiservice.db.store import JobStore
from aiservice.maintenance import maintain_forever
from aiservice.settings import Settings, SettingsError
from aiservice.worker import http, status
from aiservice.worker.kinds import Kind, describe
from aiservice.worker.kinds.llm import LLMKind
from aiservice.worker.kinds.whisperx import WhisperXKind
from aiservice.worker.notifications import dispatch_to
from aiservice.worker.runner import Runner

log = logging.getLogger(__name__)


def build_kinds(settings: Settings) -> list[Kind]:
    """The built-in workers whose provider is configured."""
    kinds: list[Kind] = []
    if settings.llm_base_url:
        kinds.append(
            LLMKind(
                base_url=settings.llm_base_url,
                api_key=settings.llm_api_key,
                model=settings.llm_model,
                timeout=settings.llm_timeout,
            )
        )
    if settings.whisperx_url:
        kinds.append(WhisperXKind(url=settings.whisperx_url, timeout=settings.whisperx_timeout))
    return kinds


def kind_limits(settings: Settings) -> dict[str, int]:
    """Jobs in flight per job kind, each within WORKER_CLAIM_LIMIT in all."""
    return {
        LLMKind.name: settings.llm_concurrency or settings.worker_claim_limit,
        WhisperXKind.name: settings.whisperx_concurrency,
    }


class Worker:
    def __init__(
        self,
        settings: Settings,
        kinds: Sequence[Kind] | None = None,
        *,
        listener_backoff: float = 0.5,
        listener_check_interval: float = 10.0,
    ) -> None:
        self.settings = settings
        self.dsn = settings.require_database()
        self.listen_dsn = settings.require_listen_database()
        self.kinds = list(build_kinds(settings) if kinds is None else kinds)
        if not self.kinds:
            raise SettingsError("no built-in worker is configured: set LLM_BASE_URL and/or WHISPERX_URL")
        self.started_at = datetime.now(UTC)
        self.http_port: int | None = None
        self._listener_backoff = listener_backoff
        self._listener_check_interval = listener_check_interval
        self._pool: Pool | None = None
        self._schema: SchemaGate | None = None
        self._store: JobStore | None = None
        self._runner: Runner | None = None
        self._listener: Listener | None = None
        # Tasks that run beside the runner until stop(): the listener, and any periodic work.
        self._tasks: list[asyncio.Task[None]] = []
        self._http: web.AppRunner | None = None
        self._started = time.monotonic()
        self._stopped = False

    @property
    def runner(self) -> Runner:
        assert self._runner is not None, "Worker.start() first"
        return self._runner

    @property
    def listener(self) -> Listener:
        assert self._listener is not None, "Worker.start() first"
        return self._listener

    async def start(self, http_sockets: Sequence[socket.socket] = ()) -> None:
        """Connect, migrate when MIGRATE_ON_START, serve the probes, and claim once the database's
        schema is this code's: until then the worker waits (its /readyz says why) instead of failing
        every claim. ``http_sockets``: the probes' sockets, bound by the caller (else WORKER_HTTP_*)."""
        settings = self.settings
        self._pool = await create_pool(
            self.dsn,
            max_size=settings.db_pool_max_size,
            application_name=_app_name("aiservice-worker", settings),
            pgbouncer=settings.database_pgbouncer,
            wait=settings.database_connect_wait.total_seconds(),
        )
        try:
            if settings.migrate_on_start:
                async with self._pool.acquire() as conn:
                    applied = await migrate(conn)
                log.info("migrations applied: %s", applied or "none (up to date)")
            self._schema = SchemaGate(self._pool)
            with contextlib.suppress(errors.DatabaseUnavailable):
                await self._schema.check()  # logs once when the schema is wrong
            self._store = JobStore(self._pool, schema=self._schema, cooldown_max=settings.cooldown_max)
            for kind in self.kinds:
                if isinstance(kind, LLMKind) and kind.read_job is None:
                    kind.read_job = self._store.get_job  # results a claim left out, for placeholders
            self._runner = Runner(
                self._store,
                self.kinds,
                worker_id=settings.worker_id,
                claim_limit=settings.worker_claim_limit,
                lease_timeout=settings.worker_lease_timeout,
                poll_interval=settings.worker_poll_interval,
                kind_limits=kind_limits(settings),
                max_dependency_bytes=settings.claim_dependency_bytes,
            )
            self._listener = Listener(
                self.listen_dsn,
                CHANNEL,
                dispatch_to(self._runner.on_event),
                on_connected=self._runner.wake,
                application_name=_app_name("aiservice-listener", settings),
                min_backoff=self._listener_backoff,
                check_interval=self._listener_check_interval,
            )
            self._tasks.append(asyncio.create_task(self._listener.run(), name="aiservice-listener"))
            if self._schema.ok:
                self._begin()
            else:
                self._tasks.append(asyncio.create_task(self._begin_when_ready(), name="aiservice-schema-wait"))
            self._http = web.AppRunner(http.create_app(self), access_log=None)
            await self._http.setup()
            sites: list[web.BaseSite] = [web.SockSite(self._http, sock) for sock in http_sockets]
            if not sites:
                sites.append(web.TCPSite(self._http, settings.worker_http_host, settings.worker_http_port))
            for site in sites:
                await site.start()
            self.http_port = int(self._http.addresses[0][1])
        except BaseException:
            await self._close()
            raise
        log.info(
            "worker %s serving %s; HTTP on %s:%s",
            settings.worker_id,
            describe(self.kinds),
            settings.worker_http_host,
            self.http_port,
        )

    def _begin(self) -> None:
        """Claim, and run maintenance (lease expiry, retention and counters happen even where no API runs)."""
        assert self._store is not None and self._runner is not None
        maintenance = maintain_forever(self._store, self.settings)
        self._tasks.append(asyncio.create_task(maintenance, name="aiservice-maintenance"))
        self._runner.start()

    async def _begin_when_ready(self) -> None:
        assert self._store is not None
        await self._store.schema_ready()
        if not self._stopped:
            log.info("worker %s claiming now", self.settings.worker_id)
            self._begin()

    def hurry(self) -> None:
        """Skip what is left of the shutdown grace period."""
        if self._runner is not None:
            self._runner.hurry()

    async def stop(self, grace: float | None = None) -> None:
        """Stop claiming, let jobs in flight finish for ``grace`` seconds, hand back the rest, close."""
        if self._stopped:
            return
        self._stopped = True
        if grace is None:
            grace = self.settings.worker_shutdown_grace.total_seconds()
        if self._runner is not None:
            await self._runner.shutdown(grace)
        await self._close()
        log.info("worker %s stopped", self.settings.worker_id)

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for kind in self.kinds:
            try:
                await kind.close()
            except Exception:
                log.exception("closing the %s worker failed", kind.name)
        if self._http is not None:
            await self._http.cleanup()
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), timeout=5.0)

    async def readiness(self) -> dict[str, Any]:
        database = "unavailable"
        if self._store is not None:
            with contextlib.suppress(errors.DatabaseUnavailable):
                await self._store.ping()
                database = "ok"
        listener = self._listener.state if self._listener is not None else "stopped"
        report: dict[str, Any] = {"database": database, "listener": listener}
        schema = self._schema.state if self._schema is not None else None
        if schema is not None and not schema.ok:  # the last reading: no query here
            report |= {"schema": schema.status, "message": schema.message}
            report |= {"expected_migration": schema.expected, "found_migration": schema.found}
        ready = database == "ok" and listener == "connected" and (schema is None or schema.ok)
        return {"ready": ready, **report}

    def status(self) -> dict[str, Any]:
        return {
            "worker_id": self.settings.worker_id,
            "started_at": self.started_at,
            "uptime_seconds": round(time.monotonic() - self._started, 3),
            "serves": status.serves(self.kinds),
            "claim_limit": self.settings.worker_claim_limit,
            "concurrency": kind_limits(self.settings),
            **(self._runner.status() if self._runner is not None else {}),
            "listener": self._listener.status() if self._listener is not None else {"state": "stopped"},
            "settings": self.settings.public(),
        }


def _app_name(prefix: str, settings: Settings) -> str:
    # PostgreSQL keeps 63 bytes; the worker id lets an operator find this worker in pg_stat_activity.
    return f"{prefix} {settings.worker_id}"[:63]
