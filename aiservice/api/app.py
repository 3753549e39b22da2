"""The aiohttp application: routes, auth and error middleware, lifecycle of the pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from functools import partial

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_async.aio.web import server_stats

from aiservice import console, errors, metrics
from aiservice.api.handlers import INFRA, PROVIDERS, ROUTES, SETTINGS, STORE, WAITERS, Handler, reply
from aiservice.api.openapi import openapi_document
from aiservice.api.schemas import ErrorBody
from aiservice.api.server import CONNECTIONS, Connections, guard_middleware
from aiservice.auth import bearer_middleware
from aiservice.db.migrate import migrate
from aiservice.db.pool import create_pool
from aiservice.db.schema import SchemaGate
from aiservice.db.store import JobStore
from aiservice.infra import InfraStatus
from aiservice.maintenance import maintain_forever
from aiservice.providers import ProviderStatus
from aiservice.settings import Settings
from aiservice.waiting import Waiters
from aiservice.webhooks import Sender

log = logging.getLogger(__name__)

# /metrics is open like the probes: it holds aggregate counts with bounded labels, no job data.
# The console's files are open too: they hold no data, and the page asks for the token itself.
PUBLIC_PATHS = frozenset([*(r.path for r in ROUTES if r.public), "/metrics", *console.PATHS])


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    resource = request.match_info.route.resource
    # The route template, never the raw path: ids would make labels unbounded.
    route = resource.canonical if resource is not None else "unmatched"
    started = asyncio.get_running_loop().time()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics.HTTP_REQUESTS.labels(route, request.method, str(status)).inc()
        metrics.HTTP_SECONDS.labels(route, request.method).observe(asyncio.get_running_loop().time() - started)


def error_response(error: errors.ServiceError) -> web.Response:
    response = reply(ErrorBody.model_validate(error.body()), error.status)
    if isinstance(error, errors.Unauthorized):
        response.headers["WWW-Authenticate"] = 'Bearer realm="aiservice"'
    if isinstance(error, errors.TooManyWaits):
        response.headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, errors.RequestTimeout):
        response.force_close()  # the rest of the body may still come: this connection is done
    return response


STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@web.middleware
async def json_only_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every state-changing request says Content-Type: application/json, or sends X-Requested-With.

    A page on another site can make a browser send a form (urlencoded, multipart, text/plain) or a
    body-less fetch to this API without asking; the browser sends neither of these without a CORS
    preflight, which this API never grants. Without a token (the development default) that is what
    stops another site from cancelling jobs through a developer's browser."""
    if (
        request.method in STATE_CHANGING
        and request.match_info.http_exception is None
        and request.content_type != "application/json"
        and not request.headers.get("X-Requested-With")
    ):
        raise errors.UnsupportedMediaType(
            f"{request.method} requests must send Content-Type: application/json (with or without a body), "
            "or an X-Requested-With header"
        )
    return await handler(request)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.ClientDisconnected as exc:
        log.info("%s %s: %s", request.method, request.path, exc.message)  # not an error of ours: no traceback
        return error_response(exc)
    except errors.ServiceError as exc:
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].http_max_body_bytes
        return error_response(errors.PayloadTooLarge(f"body is larger than {limit} bytes"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        body = ErrorBody.model_validate({"error": {"code": code, "message": exc.reason}})
        response = reply(body, exc.status)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(errors.ServiceError("internal error"))


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def create_app(settings: Settings, store: JobStore | None = None) -> web.Application:
    """Build the API. Without ``store`` it opens its own pool (and migrates) on startup."""
    connections = Connections(settings)
    middlewares: list[Middleware] = [guard_middleware(connections), metrics_middleware, error_middleware]
    if settings.service_token:
        refuse = partial(error_response, errors.Unauthorized("missing or wrong bearer token"))
        middlewares.append(bearer_middleware(settings.service_token, PUBLIC_PATHS, refuse))
    middlewares.append(json_only_middleware)
    # The LLM worker's profile keeps its own metric series, however many caller-chosen ones come first.
    metrics.expect_labels(model_profiles=[settings.llm_model])
    app = web.Application(middlewares=middlewares, client_max_size=settings.http_max_body_bytes)
    app[SETTINGS] = settings
    app[CONNECTIONS] = connections
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    app.router.add_get("/api/v1/openapi.json", openapi)
    app.router.add_get("/metrics", server_stats)
    console.add_routes(app.router, token_required=bool(settings.service_token))
    app[PROVIDERS] = ProviderStatus(settings)
    app[INFRA] = InfraStatus(settings)
    if store is not None:
        app[STORE] = store
    else:
        app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_maintenance)
    app.cleanup_ctx.append(_delivery)
    return app


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    pool = await create_pool(
        settings.require_database(),
        max_size=settings.db_pool_max_size,
        application_name="aiservice-api",
        pgbouncer=settings.database_pgbouncer,
        wait=settings.database_connect_wait.total_seconds(),
    )
    try:
        if settings.migrate_on_start:
            async with pool.acquire() as conn:
                applied = await migrate(conn)
            log.info("migrations applied: %s", applied or "none (up to date)")
        # Read once here (it logs when the schema is wrong); requests answer 503 from this reading
        # until the maintenance loop, waiting in store.schema_ready(), sees the schema arrive.
        schema = SchemaGate(pool)
        with contextlib.suppress(errors.DatabaseUnavailable):
            await schema.check()
        app[STORE] = JobStore(pool, schema=schema, cooldown_max=settings.cooldown_max)
        yield
    finally:
        await pool.close()


async def _delivery(app: web.Application) -> AsyncIterator[None]:
    """Result delivery: waiters woken by aiservice_finished, and the webhook sender."""
    sender = Sender(app[STORE], app[SETTINGS])
    settings = app[SETTINGS]
    app[WAITERS] = Waiters(
        app[STORE],
        settings.require_listen_database(),
        on_finished=sender.wake,
        max_waits=settings.wait_max_concurrent,
        max_per_caller=settings.wait_max_per_caller,
        readers=max(1, settings.db_pool_max_size // 2),  # the rest of the pool stays free for other requests
    )
    tasks = [
        asyncio.create_task(app[WAITERS].run(), name="aiservice-waiters"),
        asyncio.create_task(sender.run(), name="aiservice-webhooks"),
    ]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _maintenance(app: web.Application) -> AsyncIterator[None]:
    """Maintenance passes (lease expiry, retention, counters), then the queue gauges from fresh statistics."""
    store = app[STORE]

    async def refresh() -> None:
        metrics.refresh_queue(await store.stats())

    task = asyncio.create_task(maintain_forever(store, app[SETTINGS], refresh), name="aiservice-maintenance")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
