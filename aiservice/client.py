"""A typed async client for the HTTP API (/api/v1), for services that hand jobs to aiservice.

    async with AsyncClient("http://aiservice:8080") as client:
        job = await client.create_job(owner_service="telephony", owner_ref="beeline/42",
                                      task_type="llm_chat", model_profile="qwen2.5-14b",
                                      input={"user": "Hi"}, idempotency_key="beeline/42/hi")
        job = await client.wait(job.id, timeout=300)

One method per route, named like the server's handler, returning the pydantic models the server
serializes (aiservice.jobs, aiservice.api.schemas). Errors are raised as the typed exceptions below,
carrying the server's code, message and details.

The token is the ``token`` argument or, when that is None, the AI_SERVICE_TOKEN environment variable
(the variable the service itself reads), sent as ``Authorization: Bearer``.

Retries: idempotent calls (GET, PUT, DELETE, POST /jobs/wait, create_job with an idempotency_key,
and create_jobs when every job has one) are tried up to ``max_tries`` times on 502/503/504 and connection errors, with
exponential backoff and full jitter. Other POSTs are sent once: a lost answer is not retried, since
the server may have acted on the request."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from enum import Enum
from types import TracebackType
from typing import Any, Final, Literal, TypedDict, TypeVar, Unpack, overload
from urllib.parse import quote, urlencode
from uuid import UUID

import aiohttp
from pydantic import BaseModel
from pydantic_core import to_jsonable_python
from yarl import URL

from aiservice.api.schemas import (
    Affected,
    BatchCreated,
    BatchPage,
    ClaimedJobs,
    DeliveryPage,
    DependenciesPage,
    InfraReport,
    JobPage,
    Jobs,
    Lease,
    Limits,
    ProvidersStatus,
    Webhooks,
)
from aiservice.jobs import (
    FINISHED,
    Batch,
    ClaimedJob,
    Delivery,
    Job,
    JobStatus,
    Limit,
    LimitScope,
    Stats,
    Webhook,
    WebhookEvent,
)

__all__ = [
    "AiserviceError",
    "AsyncClient",
    "BadRequest",
    "Conflict",
    "IdempotencyConflict",
    "Invalid",
    "LeaseLost",
    "NotFound",
    "Unauthorized",
    "Unavailable",
]

M = TypeVar("M", bound=BaseModel)

API: Final = "/api/v1"
# The timeout parameters (ASYNC109) are the server's wait, sent in the request, not a local cancellation.
MAX_WAIT: Final = 60.0  # the server waits at most this long per request
MAX_WAIT_IDS: Final = 1000  # ids per POST /jobs/wait
RETRY_STATUSES: Final = frozenset({502, 503, 504})
TOKEN_VARIABLE: Final = "AI_SERVICE_TOKEN"


class AiserviceError(Exception):
    """An error answer: the HTTP status, the server's error code and message, and its details (422)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details


class BadRequest(AiserviceError):
    """400 malformed body, 413 body too large, 415 not JSON."""


class Unauthorized(AiserviceError):
    """401: missing or wrong token."""


class NotFound(AiserviceError):
    """404: no such job, batch, limit, webhook or delivery."""


class Conflict(AiserviceError):
    """409: the job's state does not allow the operation (code invalid_state)."""


class LeaseLost(Conflict):
    """409 lease_lost: the job is no longer this worker's running job (fencing)."""


class IdempotencyConflict(Conflict):
    """409 idempotency_conflict: the idempotency_key names a job another request created; ``details``
    holds idempotency_key, job_id, the fields that differ and, in a batch, the job's index."""


class Invalid(AiserviceError):
    """422: validation failed; ``details`` lists the fields."""


class Unavailable(AiserviceError):
    """503 (PostgreSQL unavailable), 502/504 from a gateway, or no connection at all (status 0,
    code connection_error) — after the retries an idempotent call is allowed."""


_BY_STATUS: dict[int, type[AiserviceError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: BadRequest,
    415: BadRequest,
    422: Invalid,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


def error_from(status: int, body: bytes) -> AiserviceError:
    """The typed exception for an error answer (the server's {"error": {...}} shape, or any body)."""
    code, message, details = f"http_{status}", body[:300].decode("utf-8", "replace"), None
    try:
        error = json.loads(body)["error"]
        code, message, details = str(error["code"]), str(error["message"]), error.get("details")
    except (ValueError, KeyError, TypeError):
        pass
    if status == 409 and code == "lease_lost":
        return LeaseLost(status, code, message, details)
    if status == 409 and code == "idempotency_conflict":
        return IdempotencyConflict(status, code, message, details)
    return _BY_STATUS.get(status, AiserviceError)(status, code, message, details)


class _Unset(Enum):
    UNSET = "unset"


UNSET: Final = _Unset.UNSET
"""For set_limit: a field left UNSET keeps its value, one given as None is cleared."""

Statuses = JobStatus | str | Iterable[JobStatus | str]
Seconds = float | timedelta


def _seconds(value: Seconds) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _segment(value: str | int) -> str:
    return quote(str(value), safe="")


class JobFilter(TypedDict, total=False):
    """Which jobs: every field given must match (the server's aiservice.jobs.JobFilter). Shared by
    list_jobs and iter_jobs (ListFilter) and by retry_jobs and cancel_jobs (Selection). None is the
    same as leaving a field out."""

    owner_service: str | None
    owner_ref: str | None
    task_type: str | None
    model_profile: str | None
    status: Statuses | None
    created_after: datetime | None
    created_before: datetime | None


class Selection(JobFilter, total=False):
    """Which jobs retry_jobs and cancel_jobs act on: ids and/or filters; all=True for every job."""

    ids: Sequence[int]
    all: bool


class ListFilter(JobFilter, total=False):
    """Which jobs list_jobs and iter_jobs return: the filters, and jobs of these batches
    (``batch_id``) or whose last failure had this category (``error_category``)."""

    batch_id: int | Iterable[int] | None
    error_category: str | None


def _selection_body(s: Selection) -> dict[str, Any]:
    ids = s.get("ids")
    return _filter_fields(s) | {"ids": None if ids is None else list(ids), "all": s.get("all", False)}


def _filter_fields(f: JobFilter) -> dict[str, Any]:
    """The filters given, with ``status`` as a list."""
    status = f.get("status")
    fields = {
        "owner_service": f.get("owner_service"),
        "owner_ref": f.get("owner_ref"),
        "task_type": f.get("task_type"),
        "model_profile": f.get("model_profile"),
        "status": None if status is None else [status] if isinstance(status, str) else list(status),
        "created_after": f.get("created_after"),
        "created_before": f.get("created_before"),
    }
    return {key: value for key, value in fields.items() if value is not None}


def _query(params: Mapping[str, Any]) -> str:
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        for item in value if isinstance(value, list) else [value]:
            plain = to_jsonable_python(item)
            pairs.append((key, plain if isinstance(plain, str) else json.dumps(plain)))
    return f"?{urlencode(pairs)}" if pairs else ""


def _plain(item: Mapping[str, Any] | BaseModel) -> dict[str, Any]:
    if isinstance(item, BaseModel):
        return item.model_dump(mode="json", exclude_unset=True)
    return dict(item)


class AsyncClient:
    """The API over one aiohttp session; use ``async with`` (or call ``close()``).

    ``base_url`` is the service's root (``http://aiservice:8080``); ``timeout`` bounds each request
    in seconds (a waiting request gets its wait on top); ``max_tries`` and ``backoff`` (seconds,
    doubling per try, with full jitter, at most ``max_backoff``) govern the retries of idempotent calls."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        max_tries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
    ) -> None:
        if max_tries < 1:
            raise ValueError("max_tries must be at least 1")
        self.base_url = base_url.rstrip("/")
        token = os.environ.get(TOKEN_VARIABLE) if token is None else token
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = timeout
        self.max_tries = max_tries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        self._open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers)
        return self._session

    # Transport

    async def _send(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        idempotent: bool | None = None,
        wait: float = 0.0,
    ) -> tuple[int, bytes]:
        """One call: the status and body of a 2xx answer; an error answer raises its typed exception."""
        if idempotent is None:
            idempotent = method in ("GET", "PUT", "DELETE")
        url = URL(f"{self.base_url}{path}", encoded=True)
        data = None if body is None else json.dumps(to_jsonable_python(body)).encode()
        # Every state-changing call says JSON, body or not: the server refuses one that does not (CSRF).
        headers = {"Content-Type": "application/json"} if data is not None or method != "GET" else {}
        timeout = aiohttp.ClientTimeout(total=self.timeout + wait)
        tries = self.max_tries if idempotent else 1
        for attempt in range(1, tries + 1):
            try:
                async with self._open().request(method, url, data=data, headers=headers, timeout=timeout) as response:
                    status, raw = response.status, await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                if attempt == tries:
                    raise Unavailable(0, "connection_error", f"{method} {path}: {exc!r}") from exc
            else:
                if status < 400:
                    return status, raw
                if status not in RETRY_STATUSES or attempt == tries:
                    raise error_from(status, raw)
            delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
            await asyncio.sleep(random.uniform(0, delay))
        raise AssertionError("unreachable")

    async def _call(
        self,
        model: type[M],
        method: str,
        path: str,
        body: Any = None,
        *,
        idempotent: bool | None = None,
        wait: float = 0.0,
    ) -> M:
        _, raw = await self._send(method, path, body, idempotent=idempotent, wait=wait)
        return model.model_validate_json(raw)

    # Jobs

    async def create_job(
        self,
        *,
        owner_service: str,
        owner_ref: str,
        task_type: str,
        model_profile: str,
        input: Mapping[str, Any] | None = None,
        priority: int | None = None,
        run_at: datetime | None = None,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
        depends_on: Sequence[int] | None = None,
    ) -> Job:
        """POST /jobs. With an idempotency_key a repeat returns the existing job, so the call is retried."""
        fields = {
            "owner_service": owner_service,
            "owner_ref": owner_ref,
            "task_type": task_type,
            "model_profile": model_profile,
            "input": input,
            "priority": priority,
            "run_at": run_at,
            "max_attempts": max_attempts,
            "idempotency_key": idempotency_key,
            "depends_on": None if depends_on is None else list(depends_on),
        }
        body = {key: value for key, value in fields.items() if value is not None}
        return await self._call(Job, "POST", f"{API}/jobs", body, idempotent=idempotency_key is not None)

    async def create_jobs(
        self,
        jobs: Sequence[Mapping[str, Any] | BaseModel],
        defaults: Mapping[str, Any] | BaseModel | None = None,
    ) -> BatchCreated:
        """POST /jobs/batch: the jobs (dicts with JobCreate's fields; ``depends_on`` may name "$N"),
        each with ``defaults`` applied, as one batch.

        Retried like create_job only when every job has an idempotency_key; a repeat answers the
        existing jobs with ``batch_id`` None (read it from the jobs). Otherwise sent once."""
        items = [_plain(job) for job in jobs]
        body: dict[str, Any] = {"jobs": items}
        if defaults is not None:
            body["defaults"] = _plain(defaults)
        idempotent = bool(items) and all(item.get("idempotency_key") is not None for item in items)
        return await self._call(BatchCreated, "POST", f"{API}/jobs/batch", body, idempotent=idempotent)

    async def get_job(self, job_id: int, wait: Seconds | None = None) -> Job:
        """GET /jobs/{id}; with ``wait`` (at most 60 s) the answer comes as soon as the job finished."""
        seconds = 0.0 if wait is None else _seconds(wait)
        path = f"{API}/jobs/{_segment(job_id)}" + (_query({"wait": seconds}) if wait is not None else "")
        return await self._call(Job, "GET", path, wait=seconds)

    async def list_jobs(
        self, *, limit: int | None = None, cursor: str | int | None = None, **filters: Unpack[ListFilter]
    ) -> JobPage:
        """GET /jobs: one page, newest first; pass ``next_cursor`` back as ``cursor`` for the next."""
        params = _filter_fields(filters)
        batch_id = filters.get("batch_id")
        if batch_id is not None:
            params["batch_id"] = [batch_id] if isinstance(batch_id, int) else list(batch_id)
        error_category = filters.get("error_category")
        if error_category is not None:
            params["error_category"] = error_category
        if limit is not None:
            params["limit"] = limit
        if cursor is not None:
            params["cursor"] = cursor
        return await self._call(JobPage, "GET", f"{API}/jobs{_query(params)}")

    async def iter_jobs(self, *, page_size: int = 500, **filters: Unpack[ListFilter]) -> AsyncIterator[Job]:
        """Every matching job, newest first, fetching pages of ``page_size`` as it goes."""
        # Each page sends the filters again: an iterator given as status or batch_id is read once, here.
        status, batch_id = filters.get("status"), filters.get("batch_id")
        if status is not None and not isinstance(status, str):
            filters["status"] = list(status)
        if batch_id is not None and not isinstance(batch_id, int):
            filters["batch_id"] = list(batch_id)
        cursor: str | None = None
        while True:
            page = await self.list_jobs(limit=page_size, cursor=cursor, **filters)
            for job in page.jobs:
                yield job
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def list_dependencies(
        self, job_id: int, *, limit: int | None = None, cursor: str | int | None = None
    ) -> DependenciesPage:
        """GET /jobs/{id}/dependencies: the jobs it depends on, and a page of those that depend on it."""
        fields = {"limit": limit, "cursor": cursor}
        query = _query({key: value for key, value in fields.items() if value is not None})
        return await self._call(DependenciesPage, "GET", f"{API}/jobs/{_segment(job_id)}/dependencies{query}")

    async def wait_jobs(
        self,
        ids: Sequence[int],
        timeout: Seconds = 30,  # noqa: ASYNC109
        mode: Literal["any", "all"] = "all",
    ) -> list[Job]:
        """POST /jobs/wait: up to 1,000 jobs, answered when any or all finished, or after ``timeout``
        (at most 60 s), in the order given. A read: retried like a GET."""
        seconds = _seconds(timeout)
        body = {"ids": list(ids), "timeout": seconds, "mode": mode}
        found = await self._call(Jobs, "POST", f"{API}/jobs/wait", body, idempotent=True, wait=seconds)
        return found.jobs

    @overload
    async def wait(self, id_or_ids: int, timeout: Seconds = ..., mode: Literal["any", "all"] = ...) -> Job: ...  # noqa: ASYNC109

    @overload
    async def wait(
        self,
        id_or_ids: Sequence[int],
        timeout: Seconds = ...,  # noqa: ASYNC109
        mode: Literal["any", "all"] = ...,
    ) -> list[Job]: ...

    async def wait(
        self,
        id_or_ids: int | Sequence[int],
        timeout: Seconds = 300,  # noqa: ASYNC109
        mode: Literal["any", "all"] = "all",
    ) -> Job | list[Job]:
        """Wait until the job (or all, or with mode "any" any, of the jobs) finished or ``timeout``
        passed, asking the server again every 60 s; answers the state then — read ``status``, a job
        still unfinished after the timeout is returned as it is."""
        deadline = time.monotonic() + _seconds(timeout)
        if isinstance(id_or_ids, int):
            while True:
                job = await self.get_job(id_or_ids, wait=min(MAX_WAIT, max(0.0, deadline - time.monotonic())))
                if job.status in FINISHED or time.monotonic() >= deadline:
                    return job
        ids = list(id_or_ids)
        unique = list(dict.fromkeys(ids))
        if mode == "any" and len(unique) > MAX_WAIT_IDS:
            raise ValueError(f"mode 'any' waits on at most {MAX_WAIT_IDS} jobs")
        state: dict[int, Job] = {}

        def unfinished() -> list[int]:
            return [i for i in unique if i not in state or state[i].status not in FINISHED]

        while waiting := unfinished():
            if mode == "any" and len(waiting) < len(unique):
                break
            left = deadline - time.monotonic()
            if left <= 0 and all(i in state for i in unique):
                break
            chunk = waiting[:MAX_WAIT_IDS]
            state.update((job.id, job) for job in await self.wait_jobs(chunk, min(MAX_WAIT, max(0.0, left)), mode))
        return [state[i] for i in ids]

    async def retry_job(self, job_id: int) -> Job:
        """POST /jobs/{id}/retry: a failed or running job back to pending (409 otherwise)."""
        return await self._call(Job, "POST", f"{API}/jobs/{_segment(job_id)}/retry")

    async def cancel_job(self, job_id: int) -> Job:
        """POST /jobs/{id}/cancel: cancel a pending or running job (409 otherwise)."""
        return await self._call(Job, "POST", f"{API}/jobs/{_segment(job_id)}/cancel")

    async def retry_jobs(self, **selection: Unpack[Selection]) -> Affected:
        """POST /jobs/retry: reset the failed/running jobs selected (an empty selection needs all=True)."""
        return await self._call(Affected, "POST", f"{API}/jobs/retry", _selection_body(selection))

    async def cancel_jobs(self, **selection: Unpack[Selection]) -> Affected:
        """POST /jobs/cancel: cancel the pending/running jobs selected (an empty selection needs all=True)."""
        return await self._call(Affected, "POST", f"{API}/jobs/cancel", _selection_body(selection))

    # External workers

    async def claim_jobs(
        self,
        worker_id: str,
        limit: int = 1,
        *,
        task_types: Sequence[str] | None = None,
        model_profiles: Sequence[str] | None = None,
        lease_timeout: Seconds | None = None,
    ) -> list[ClaimedJob]:
        """POST /jobs/claim: each job with its ``lease_token`` and its dependencies' results."""
        body: dict[str, Any] = {"worker_id": worker_id, "limit": limit}
        if task_types is not None:
            body["task_types"] = list(task_types)
        if model_profiles is not None:
            body["model_profiles"] = list(model_profiles)
        if lease_timeout is not None:
            body["lease_timeout"] = _seconds(lease_timeout)
        return (await self._call(ClaimedJobs, "POST", f"{API}/jobs/claim", body)).jobs

    async def complete_job(
        self, job_id: int, worker_id: str, result: Mapping[str, Any], *, lease_token: UUID | str | None = None
    ) -> Job:
        """POST /jobs/{id}/complete; LeaseLost when the job is no longer this worker's (fencing)."""
        body = {"worker_id": worker_id, "result": dict(result), "lease_token": lease_token}
        return await self._call(Job, "POST", f"{API}/jobs/{_segment(job_id)}/complete", body)

    async def fail_job(
        self,
        job_id: int,
        worker_id: str,
        error_category: str,
        error_message: str | None = None,
        *,
        retryable: bool | None = None,
        retry_after: Seconds | None = None,
        lease_token: UUID | str | None = None,
    ) -> Job:
        """POST /jobs/{id}/fail; LeaseLost when the job is no longer this worker's (fencing)."""
        body = {
            "worker_id": worker_id,
            "error_category": error_category,
            "error_message": error_message,
            "retryable": retryable,
            "retry_after": None if retry_after is None else _seconds(retry_after),
            "lease_token": lease_token,
        }
        return await self._call(Job, "POST", f"{API}/jobs/{_segment(job_id)}/fail", body)

    async def heartbeat_job(
        self,
        job_id: int,
        worker_id: str,
        *,
        lease_timeout: Seconds | None = None,
        lease_token: UUID | str | None = None,
    ) -> Lease:
        """POST /jobs/{id}/heartbeat: extend the lease; LeaseLost when it was lost."""
        body = {
            "worker_id": worker_id,
            "lease_timeout": None if lease_timeout is None else _seconds(lease_timeout),
            "lease_token": lease_token,
        }
        return await self._call(Lease, "POST", f"{API}/jobs/{_segment(job_id)}/heartbeat", body)

    # Observability

    async def stats(self, window: Seconds | None = None) -> Stats:
        """GET /stats (``window`` for the latency percentiles, default an hour)."""
        query = "" if window is None else _query({"window": _seconds(window)})
        return await self._call(Stats, "GET", f"{API}/stats{query}")

    async def providers_status(self) -> ProvidersStatus:
        return await self._call(ProvidersStatus, "GET", f"{API}/providers/status")

    async def infra_status(self) -> InfraReport:
        return await self._call(InfraReport, "GET", f"{API}/infra/status")

    # Limits

    async def list_limits(self) -> list[Limit]:
        return (await self._call(Limits, "GET", f"{API}/limits")).limits

    async def set_limit(
        self,
        scope: LimitScope | Literal["task_type", "model_profile", "owner_service"],
        name: str,
        *,
        paused: bool | _Unset | None = UNSET,
        max_running: int | _Unset | None = UNSET,
        max_per_minute: int | _Unset | None = UNSET,
        max_tokens_per_minute: int | _Unset | None = UNSET,
        weight: int | _Unset | None = UNSET,
        cooldown: bool | _Unset | None = UNSET,
        cooldown_until: _Unset | None = UNSET,
    ) -> Limit:
        """PUT /limits/{scope}/{name}: the fields given are set (None clears one), the others kept.
        ``weight`` is for owner_service limits only, ``cooldown`` and ``cooldown_until`` for
        model_profile limits only (Invalid, 422, for another scope)."""
        fields = {
            "paused": paused,
            "max_running": max_running,
            "max_per_minute": max_per_minute,
            "max_tokens_per_minute": max_tokens_per_minute,
            "weight": weight,
            "cooldown": cooldown,
            "cooldown_until": cooldown_until,
        }
        body = {key: value for key, value in fields.items() if value is not UNSET}
        return await self._call(Limit, "PUT", f"{API}/limits/{_segment(scope)}/{_segment(name)}", body)

    async def delete_limit(self, scope: LimitScope | str, name: str) -> None:
        """DELETE /limits/{scope}/{name}; NotFound when there is none."""
        await self._send("DELETE", f"{API}/limits/{_segment(scope)}/{_segment(name)}")

    # Batches

    async def get_batch(self, batch_id: int) -> Batch:
        return await self._call(Batch, "GET", f"{API}/batches/{_segment(batch_id)}")

    async def list_batches(
        self, *, owner_service: str | None = None, limit: int | None = None, cursor: str | int | None = None
    ) -> BatchPage:
        """GET /batches: one page, newest first; pass ``next_cursor`` back as ``cursor`` for the next."""
        fields = {"owner_service": owner_service, "limit": limit, "cursor": cursor}
        query = _query({key: value for key, value in fields.items() if value is not None})
        return await self._call(BatchPage, "GET", f"{API}/batches{query}")

    async def cancel_batch(self, batch_id: int) -> Batch:
        """POST /batches/{id}/cancel: cancel its pending and running jobs; answers the batch."""
        return await self._call(Batch, "POST", f"{API}/batches/{_segment(batch_id)}/cancel")

    # Webhooks

    async def set_webhook(
        self,
        owner_service: str,
        url: str,
        *,
        events: Sequence[WebhookEvent] | None = None,
        rotate_secret: bool = False,
    ) -> Webhook:
        """PUT /webhooks/{owner_service}: ``secret`` is set in the answer only when the endpoint was
        created or ``rotate_secret`` was asked for — keep it then, it is never shown again."""
        body: dict[str, Any] = {"url": url, "rotate_secret": rotate_secret}
        if events is not None:
            body["events"] = list(events)
        return await self._call(Webhook, "PUT", f"{API}/webhooks/{_segment(owner_service)}", body)

    async def list_webhooks(self) -> list[Webhook]:
        return (await self._call(Webhooks, "GET", f"{API}/webhooks")).webhooks

    async def delete_webhook(self, owner_service: str) -> None:
        await self._send("DELETE", f"{API}/webhooks/{_segment(owner_service)}")

    async def list_deliveries(
        self,
        owner_service: str,
        *,
        status: Literal["pending", "retrying", "delivered", "failed"] | None = None,
        limit: int | None = None,
        cursor: str | int | None = None,
    ) -> DeliveryPage:
        fields = {"status": status, "limit": limit, "cursor": cursor}
        query = _query({key: value for key, value in fields.items() if value is not None})
        return await self._call(DeliveryPage, "GET", f"{API}/webhooks/{_segment(owner_service)}/deliveries{query}")

    async def retry_delivery(self, owner_service: str, delivery_id: int) -> Delivery:
        path = f"{API}/webhooks/{_segment(owner_service)}/deliveries/{_segment(delivery_id)}/retry"
        return await self._call(Delivery, "POST", path)
