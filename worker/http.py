"""The worker's own HTTP server for Kubernetes probes, operators and Prometheus; open, with no token."""

from __future__ import annotations

import json
from datetime import datetime
from functools import partial
from typing import Any, Protocol

from aiohttp import web
from prometheus_async.aio.web import server_stats


class Probe(Protocol):
    async def readiness(self) -> dict[str, Any]:
        """At least ``ready`` (bool); the rest explains it."""
        ...

    def status(self) -> dict[str, Any]: ...


PROBE = web.AppKey("probe", Probe)


def _default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_dumps = partial(json.dumps, default=_default)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    report = await request.app[PROBE].readiness()
    ready = bool(report.get("ready"))
    body = {"status": "ready" if ready else "not_ready"} | report
    return web.json_response(body, status=200 if ready else 503, dumps=_dumps)


async def worker_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[PROBE].status(), dumps=_dumps)


def create_app(probe: Probe) -> web.Application:
    app = web.Application()
    app[PROBE] = probe
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/worker/status", worker_status)
    app.router.add_get("/metrics", server_stats)
    return app
