"""HTTP handlers: parse with pydantic, one repository call, serialize.

A handler that calls an SQL function is named for it, as is the JobStore method between them."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from aiservice import errors
from aiservice.api.schemas import (
    Affected,
    BatchCreate,
    BatchCreated,
    BatchPage,
    BatchQuery,
    ClaimedJobs,
    ClaimRequest,
    CompleteRequest,
    DeliveryPage,
    DeliveryQuery,
    DependenciesPage,
    DependenciesQuery,
    FailRequest,
    FilterAction,
    Health,
    HeartbeatRequest,
    InfraReport,
    JobPage,
    Jobs,
    Lease,
    LimitChange,
    Limits,
    ListQuery,
    ProvidersStatus,
    Readiness,
    StatsQuery,
    WaitQuery,
    WaitRequest,
    Webhooks,
    WebhookSet,
)
from aiservice.db.store import JobStore
from aiservice.infra import InfraStatus
from aiservice.jobs import FINISHED, Batch, Delivery, Job, JobCreate, Limit, Stats, Webhook
from aiservice.providers import ProviderStatus
from aiservice.settings import Settings, format_duration
from aiservice.waiting import Waiters
from aiservice.webhooks import new_secret

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", JobStore)
PROVIDERS = web.AppKey("providers", ProviderStatus)
INFRA = web.AppKey("infra", InfraStatus)
WAITERS = web.AppKey("waiters", Waiters)

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def validation_error(exc: ValidationError) -> errors.InvalidArgument:
    details = [
        {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]
    first = details[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return errors.InvalidArgument(f"{where}: {first['msg']}", details=details)


async def body(request: web.Request, model: type[M]) -> M:
    if request.content_type != "application/json":
        raise errors.UnsupportedMediaType("send the body as application/json")
    try:
        raw = await _read_body(request)
    except ConnectionResetError as exc:  # the client went away mid-body (aiohttp: "Connection lost")
        raise errors.ClientDisconnected("the client closed the connection before its body arrived") from exc
    try:
        # Strict UTF-8 (RFC 8259): json.loads(bytes) would also let encoded surrogates through.
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise errors.BadRequest("body is not valid UTF-8") from exc
    except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, or an integer over 4300 digits
        raise errors.BadRequest(f"body is not valid JSON: {exc}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from exc


async def _read_body(request: web.Request) -> bytes:
    """The whole body, up to HTTP_MAX_BODY_BYTES (413 past it); 408 when it pauses for HTTP_BODY_TIMEOUT."""
    settings = request.app[SETTINGS]
    limit, pause = settings.http_max_body_bytes, settings.http_body_timeout.total_seconds()
    raw = bytearray()
    while True:
        try:
            async with asyncio.timeout(pause):
                chunk = await request.content.readany()
        except TimeoutError as exc:
            raise errors.RequestTimeout(
                f"the body stopped arriving for {format_duration(settings.http_body_timeout)} (HTTP_BODY_TIMEOUT)"
            ) from exc
        if not chunk:
            return bytes(raw)
        raw += chunk
        if len(raw) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(raw))


def query(request: web.Request, model: type[M]) -> M:
    data: dict[str, Any] = {}
    for key in request.query:
        values = request.query.getall(key)
        field = model.model_fields.get(key)
        repeatable = field is not None and "list" in str(field.annotation)
        data[key] = values if repeatable else values[-1]
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def path_id(request: web.Request, noun: str = "job") -> int:
    """The {id} of the path, a bigint; errors name it for what it is ("batch id", "delivery id")."""
    raw = request.match_info["id"]
    # ASCII digits only: int() alone also takes " 1", "+1", "1_0" and digits of other scripts.
    if not (raw.isascii() and raw.isdigit()):
        raise errors.InvalidArgument(f"{noun} id must be a positive integer, got {raw[:40]!r}")
    value = int(raw) if len(raw) <= 19 else 0
    if not 1 <= value < 2**63:
        raise errors.InvalidArgument(f"{noun} id is out of range")
    return value


def reply(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(body=model.model_dump_json().encode(), status=status, content_type="application/json")


def store(request: web.Request) -> JobStore:
    return request.app[STORE]


async def create_job(request: web.Request) -> web.Response:
    job, created = await store(request).create_job(await body(request, JobCreate))
    return reply(job, 201 if created else 200)


async def create_jobs(request: web.Request) -> web.Response:
    batch = await body(request, BatchCreate)
    incomplete = batch.incomplete()
    if incomplete is not None:
        raise validation_error(incomplete)
    created = await store(request).create_jobs(batch.jobs, batch.defaults)
    batch_id = next((job.batch_id for job, new in created if new), None)
    return reply(BatchCreated(batch_id=batch_id, jobs=[job for job, _ in created]), 201)


async def list_jobs(request: web.Request) -> web.Response:
    q = query(request, ListQuery)
    found = await store(request).list_jobs(
        q, before_id=q.cursor, limit=q.limit, batch_ids=q.batch_id, error_category=q.error_category
    )
    cursor = str(found[-1].id) if len(found) == q.limit else None
    return reply(JobPage(jobs=found, next_cursor=cursor))


def caller(request: web.Request) -> str:
    """Who is asking, for per-caller bounds: the bearer token when the service has one (as a digest,
    so the secret is not kept twice), else the client's address."""
    if request.app[SETTINGS].service_token:
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogatepass")
        return "token:" + hashlib.sha256(given).hexdigest()[:16]
    return f"address:{request.remote}"


async def get_job(request: web.Request) -> web.Response:
    wait = query(request, WaitQuery).wait
    job = await store(request).get_job(path_id(request))
    if wait and job.status not in FINISHED:
        (document,) = await request.app[WAITERS].wait([job.id], "any", wait, caller(request))
        return web.Response(body=document, content_type="application/json")
    return reply(job)


async def list_dependencies(request: web.Request) -> web.Response:
    jid = path_id(request)
    q = query(request, DependenciesQuery)
    found = await store(request).list_dependencies(jid, after_id=q.cursor, limit=q.limit)
    cursor = str(found.dependents[-1].id) if len(found.dependents) == q.limit else None
    return reply(DependenciesPage(**dict(found), next_cursor=cursor))


async def wait_jobs(request: web.Request) -> web.StreamResponse:
    request.app[WAITERS].check_room(caller(request))  # a refusal costs no body parsing
    req = await body(request, WaitRequest)
    ids = list(dict.fromkeys(req.ids))
    # Unknown ids are refused (404) before any waiting.
    documents = await request.app[WAITERS].wait(ids, req.mode, req.timeout, caller(request))
    return await _stream_jobs(request, documents)


async def _stream_jobs(request: web.Request, documents: list[bytes]) -> web.StreamResponse:
    """{"jobs": [...]} (the Jobs body) written in pieces as the client reads them: many large answers
    at once are not all held in memory, and the job documents are shared between waits."""
    head, tail = b'{"jobs":[', b"]}"
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(head) + sum(map(len, documents)) + max(len(documents) - 1, 0) + len(tail)
    await response.prepare(request)
    chunk = bytearray(head)
    try:
        for n, document in enumerate(documents):
            if n:
                chunk += b","
            chunk += document
            if len(chunk) >= 64 * 1024:
                await response.write(bytes(chunk))
                chunk.clear()
        chunk += tail
        await response.write(bytes(chunk))
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away: nobody reads the rest
    return response


async def get_batch(request: web.Request) -> web.Response:
    return reply(await store(request).get_batch(path_id(request, "batch")))


async def list_batches(request: web.Request) -> web.Response:
    q = query(request, BatchQuery)
    found = await store(request).list_batches(q.owner_service, before_id=q.cursor, limit=q.limit)
    cursor = str(found[-1].id) if len(found) == q.limit else None
    return reply(BatchPage(batches=found, next_cursor=cursor))


async def cancel_batch(request: web.Request) -> web.Response:
    return reply(await store(request).cancel_batch(path_id(request, "batch")))


async def set_webhook(request: web.Request) -> web.Response:
    req = await body(request, WebhookSet)
    hook = await store(request).set_webhook(
        request.match_info["owner_service"],
        req.url,
        new_secret(),
        events=None if req.events is None else list(req.events),
        rotate=req.rotate_secret,
    )
    return reply(hook)


async def list_webhooks(request: web.Request) -> web.Response:
    return reply(Webhooks(webhooks=await store(request).list_webhooks()))


async def delete_webhook(request: web.Request) -> web.Response:
    await store(request).delete_webhook(request.match_info["owner_service"])
    return web.Response(status=204)


async def list_deliveries(request: web.Request) -> web.Response:
    q = query(request, DeliveryQuery)
    owner = request.match_info["owner_service"]
    found = await store(request).list_deliveries(owner, status=q.status, before_id=q.cursor, limit=q.limit)
    cursor = str(found[-1].id) if len(found) == q.limit else None
    return reply(DeliveryPage(deliveries=found, next_cursor=cursor))


async def retry_delivery(request: web.Request) -> web.Response:
    owner = request.match_info["owner_service"]
    return reply(await store(request).retry_delivery(owner, path_id(request, "delivery")))


async def claim_jobs(request: web.Request) -> web.Response:
    req = await body(request, ClaimRequest)
    settings = request.app[SETTINGS]
    lease = settings.worker_lease_timeout if req.lease_timeout is None else _seconds(req.lease_timeout)
    claimed = await store(request).claim_jobs(
        req.worker_id,
        req.limit,
        lease_timeout=lease,
        task_types=req.task_types,
        model_profiles=req.model_profiles,
        max_dependency_bytes=settings.claim_dependency_bytes,
    )
    return reply(ClaimedJobs(jobs=claimed))


async def heartbeat_job(request: web.Request) -> web.Response:
    jid = path_id(request)
    req = await body(request, HeartbeatRequest)
    settings = request.app[SETTINGS]
    lease = settings.worker_lease_timeout if req.lease_timeout is None else _seconds(req.lease_timeout)
    expires = await store(request).heartbeat_job(jid, req.worker_id, lease_timeout=lease, lease_token=req.lease_token)
    return reply(Lease(id=jid, lease_expires_at=expires))


async def complete_job(request: web.Request) -> web.Response:
    jid = path_id(request)
    req = await body(request, CompleteRequest)
    return reply(await store(request).complete_job(jid, req.worker_id, req.result, lease_token=req.lease_token))


async def fail_job(request: web.Request) -> web.Response:
    jid = path_id(request)
    req = await body(request, FailRequest)
    job = await store(request).fail_job(
        jid,
        req.worker_id,
        req.error_category,
        req.error_message,
        retryable=req.retryable,
        retry_after=req.retry_delay(),
        lease_token=req.lease_token,
        cooldown_max=request.app[SETTINGS].cooldown_max,
    )
    return reply(job)


async def retry_job(request: web.Request) -> web.Response:
    return reply(await store(request).retry_job(path_id(request)))


async def cancel_job(request: web.Request) -> web.Response:
    return reply(await store(request).cancel_job(path_id(request)))


async def retry_jobs(request: web.Request) -> web.Response:
    ids = await store(request).retry_jobs(await body(request, FilterAction))
    return reply(Affected(count=len(ids), ids=ids))


async def cancel_jobs(request: web.Request) -> web.Response:
    ids = await store(request).cancel_jobs(await body(request, FilterAction))
    return reply(Affected(count=len(ids), ids=ids))


async def stats(request: web.Request) -> web.Response:
    q = query(request, StatsQuery)
    return reply(await store(request).stats(_seconds(q.window)))


async def list_limits(request: web.Request) -> web.Response:
    return reply(Limits(limits=await store(request).list_limits()))


async def set_limit(request: web.Request) -> web.Response:
    change = await body(request, LimitChange)
    fields = change.model_dump(exclude_unset=True)
    return reply(await store(request).set_limit(request.match_info["scope"], request.match_info["name"], fields))


async def delete_limit(request: web.Request) -> web.Response:
    await store(request).delete_limit(request.match_info["scope"], request.match_info["name"])
    return web.Response(status=204)


async def providers_status(request: web.Request) -> web.Response:
    return reply(ProvidersStatus.model_validate(await request.app[PROVIDERS].status()))


async def infra_status(request: web.Request) -> web.Response:
    return reply(InfraReport.model_validate(await request.app[INFRA].status()))


async def healthz(request: web.Request) -> web.Response:
    return reply(Health(status="ok"))


async def readyz(request: web.Request) -> web.Response:
    jobs = store(request)
    try:
        await jobs.ping()
    except errors.DatabaseUnavailable:
        return _ready(Readiness(status="database unavailable"), 503)
    schema = jobs.schema_state  # the last reading: no query here
    if schema is not None and not schema.ok:
        found = Readiness(
            status=schema.status,
            message=schema.message,
            expected_migration=schema.expected,
            found_migration=schema.found,
        )
        return _ready(found, 503)
    return _ready(Readiness(status="ready"))


def _ready(readiness: Readiness, status: int = 200) -> web.Response:
    body = readiness.model_dump_json(exclude_none=True).encode()
    return web.Response(body=body, status=status, content_type="application/json")


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    response: type[BaseModel]
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    status: int = 200
    also: tuple[int, ...] = ()  # other success statuses
    public: bool = False  # open without the bearer token (Kubernetes probes)
    errors: tuple[int, ...] = ()


API = "/api/v1"
ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        f"{API}/jobs",
        create_job,
        "Create one job (200 with the existing job for a repeated idempotency_key; 409 when the repeat differs)",
        Job,
        body=JobCreate,
        status=201,
        also=(200,),
        errors=(400, 409, 415, 422),
    ),
    Route(
        "GET",
        f"{API}/jobs",
        list_jobs,
        "List jobs, newest first, with filters and keyset pagination",
        JobPage,
        query=ListQuery,
        errors=(422,),
    ),
    Route(
        "POST",
        f"{API}/jobs/batch",
        create_jobs,
        "Create many jobs with shared defaults, as one batch (409, nothing created, when a repeat differs)",
        BatchCreated,
        body=BatchCreate,
        status=201,
        errors=(400, 409, 415, 422),
    ),
    Route(
        "POST",
        f"{API}/jobs/retry",
        retry_jobs,
        "Reset failed/running jobs matching a filter to pending",
        Affected,
        body=FilterAction,
        errors=(400, 415, 422),
    ),
    Route(
        "POST",
        f"{API}/jobs/cancel",
        cancel_jobs,
        "Cancel pending/running jobs matching a filter",
        Affected,
        body=FilterAction,
        errors=(400, 415, 422),
    ),
    Route(
        "POST",
        f"{API}/jobs/claim",
        claim_jobs,
        "Atomically claim pending jobs for a worker (each with its dependencies' results)",
        ClaimedJobs,
        body=ClaimRequest,
        errors=(400, 415, 422),
    ),
    Route(
        "GET",
        f"{API}/jobs/{{id}}",
        get_job,
        "Technical job state and result; ?wait=N answers as soon as it finished, or after N s",
        Job,
        query=WaitQuery,
        errors=(404, 422, 429),
    ),
    Route(
        "GET",
        f"{API}/jobs/{{id}}/dependencies",
        list_dependencies,
        "The jobs it depends on, and those that depend on it (paged by cursor)",
        DependenciesPage,
        query=DependenciesQuery,
        errors=(404, 422),
    ),
    Route(
        "POST",
        f"{API}/jobs/{{id}}/complete",
        complete_job,
        "Store a successful result (fenced by worker)",
        Job,
        body=CompleteRequest,
        errors=(400, 404, 409, 415, 422),
    ),
    Route(
        "POST",
        f"{API}/jobs/{{id}}/fail",
        fail_job,
        "Store a failure category and message (fenced by worker)",
        Job,
        body=FailRequest,
        errors=(400, 404, 409, 415, 422),
    ),
    Route(
        "POST",
        f"{API}/jobs/{{id}}/heartbeat",
        heartbeat_job,
        "Extend the lease of a running job",
        Lease,
        body=HeartbeatRequest,
        errors=(400, 404, 409, 415, 422),
    ),
    Route(
        "POST",
        f"{API}/jobs/{{id}}/retry",
        retry_job,
        "Reset a failed/running job to pending",
        Job,
        errors=(404, 409, 422),
    ),
    Route("POST", f"{API}/jobs/{{id}}/cancel", cancel_job, "Cancel a pending/running job", Job, errors=(404, 409, 422)),
    Route(
        "GET",
        f"{API}/stats",
        stats,
        "Queue, error, throughput and latency statistics",
        Stats,
        query=StatsQuery,
        errors=(422,),
    ),
    Route(
        "GET",
        f"{API}/providers/status",
        providers_status,
        "Reachability of the configured AI providers (cached briefly; no secrets)",
        ProvidersStatus,
    ),
    Route(
        "GET",
        f"{API}/infra/status",
        infra_status,
        "AI-server sidecar telemetry: GPU, containers, vLLM, WhisperX",
        InfraReport,
    ),
    Route(
        "POST",
        f"{API}/jobs/wait",
        wait_jobs,
        "Wait until any or all of the jobs finished (or the timeout); answers their state",
        Jobs,
        body=WaitRequest,
        errors=(400, 404, 415, 422, 429),
    ),
    Route(
        "GET",
        f"{API}/batches",
        list_batches,
        "Batches, newest first, optionally of one owner_service, with keyset pagination",
        BatchPage,
        query=BatchQuery,
        errors=(422,),
    ),
    Route("GET", f"{API}/batches/{{id}}", get_batch, "A batch with its counts", Batch, errors=(404, 422)),
    Route(
        "POST",
        f"{API}/batches/{{id}}/cancel",
        cancel_batch,
        "Cancel a batch's pending and running jobs",
        Batch,
        errors=(404, 422),
    ),
    Route("GET", f"{API}/webhooks", list_webhooks, "Every webhook endpoint (secrets never shown)", Webhooks),
    Route(
        "PUT",
        f"{API}/webhooks/{{owner_service}}",
        set_webhook,
        "Register or change an owner_service's endpoint (the secret is shown when created or rotated)",
        Webhook,
        body=WebhookSet,
        errors=(400, 415, 422),
    ),
    Route(
        "DELETE",
        f"{API}/webhooks/{{owner_service}}",
        delete_webhook,
        "Remove an endpoint",
        Webhooks,
        status=204,
        errors=(404, 422),
    ),
    Route(
        "GET",
        f"{API}/webhooks/{{owner_service}}/deliveries",
        list_deliveries,
        "An endpoint's deliveries, newest first",
        DeliveryPage,
        query=DeliveryQuery,
        errors=(422,),
    ),
    Route(
        "POST",
        f"{API}/webhooks/{{owner_service}}/deliveries/{{id}}/retry",
        retry_delivery,
        "Send a delivery again now",
        Delivery,
        errors=(404, 422),
    ),
    Route("GET", f"{API}/limits", list_limits, "Every capacity limit with its live usage", Limits),
    Route(
        "PUT",
        f"{API}/limits/{{scope}}/{{name}}",
        set_limit,
        "Create or change a limit (scope: task_type, model_profile or owner_service)",
        Limit,
        body=LimitChange,
        errors=(400, 415, 422),
    ),
    Route(
        "DELETE",
        f"{API}/limits/{{scope}}/{{name}}",
        delete_limit,
        "Remove a limit",
        Limits,
        status=204,
        errors=(404, 422),
    ),
    Route("GET", "/healthz", healthz, "Process health", Health, public=True),
    Route(
        "GET",
        "/readyz",
        readyz,
        "Readiness: PostgreSQL answers and its schema is at this code's migration (else 503)",
        Readiness,
        public=True,
        errors=(503,),
    ),
)
