"""The sidecar's HTTP server: open /healthz, and /status behind an optional bearer token."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from aiservice.auth import bearer_middleware
from aiservice.sidecar.collector import Collector
from aiservice.sidecar.settings import SidecarSettings

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("sidecar_settings", SidecarSettings)
COLLECTOR = web.AppKey("sidecar_collector", Collector)
PUBLIC_PATHS = frozenset({"/healthz"})


def refuse() -> web.Response:
    return web.json_response(
        {"error": {"code": "unauthorized", "message": "missing or wrong bearer token"}},
        status=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def status(request: web.Request) -> web.Response:
    document = await request.app[COLLECTOR].status()
    # Telemetry is only true for the moment it was taken; a proxy keeps its own short cache.
    return web.json_response(document, headers={"Cache-Control": "no-store"})


def create_app(settings: SidecarSettings, *, clock: Callable[[], float] = time.monotonic) -> web.Application:
    """Build the sidecar. ``clock`` times the scrapes behind token rates (tests pass their own)."""
    middlewares = [bearer_middleware(settings.token, PUBLIC_PATHS, refuse)] if settings.token else []
    app = web.Application(middlewares=middlewares)
    app[SETTINGS] = settings
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status", status)

    async def collector(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as session:
            app[COLLECTOR] = Collector(settings, session, clock)
            try:
                yield
            finally:
                await app[COLLECTOR].close()

    app.cleanup_ctx.append(collector)
    return app


def run(settings: SidecarSettings) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    log.info("sidecar starting: %s", settings.public())
    web.run_app(create_app(settings), host=settings.host, port=settings.port, print=None)
