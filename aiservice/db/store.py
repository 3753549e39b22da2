"""The repository: every call from Python into the aiservice SQL API goes through here.

Each JobStore method is named for the SQL function it calls (list_jobs calls aiservice.list_jobs)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

import asyncpg

from aiservice import errors
from aiservice.jobs import (
    CLAIMED_LIST,
    FINISHED,
    JOB_LIST,
    JOB_SPECS,
    Batch,
    BatchJob,
    ClaimedJob,
    Delivery,
    Dependencies,
    Job,
    JobCreate,
    JobDefaults,
    JobFilter,
    JobSelection,
    JobStatus,
    Limit,
    Stats,
    Webhook,
)
from aiservice.settings import mask_url_values, redact_url

if TYPE_CHECKING:
    from aiservice.db.schema import SchemaGate, SchemaState

log = logging.getLogger(__name__)

# Whole-row columns of aiservice.jobs, for functions that return (job, created).
_JOB_AND_CREATED = "(r.job).*, r.created"

UNAVAILABLE = "PostgreSQL is unavailable; retry later"
CONTENDED = "the request collided with concurrent ones ({reason}) and was rolled back; retry it"

# Errors that name a constraint are told to callers of the Python and HTTP API in their own words:
# SQL's text speaks of its arguments (p_all) and of constraint names, which mean nothing to them.
# SQL callers keep SQL's text. tests/test_rules.py checks that every constraint named here exists.
CALLER_WORDS = {
    "jobs_run_at_finite_check": "run_at is out of range",
    "jobs_lease_finite_check": "lease_timeout is out of range",
    "retry_jobs_filter_required": 'refusing to retry every job: give a filter or ids, or "all": true',
    "cancel_jobs_filter_required": 'refusing to cancel every job: give a filter or ids, or "all": true',
}
_CONNECTION_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionFailureError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # PostgreSQL's FATAL (a restart, pg_terminate_backend) read on an idle pooled connection just
    # before its close: asyncpg refuses the next operation on it with this until the close arrives.
    asyncpg.InternalClientError,
)


@asynccontextmanager
async def translate_errors() -> AsyncIterator[None]:
    """Turn PostgreSQL errors into the service's error tree (custom SQLSTATEs first)."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        kind = errors.SQLSTATE_ERRORS.get(exc.sqlstate or "")
        if kind is None:
            raise
        if kind is errors.DatabaseUnavailable:
            # PostgreSQL's own text would name databases and users: keep it in the logs only.
            raise errors.DatabaseUnavailable(UNAVAILABLE) from exc
        if kind is errors.Contention:
            reason = "deadlock detected" if exc.sqlstate == "40P01" else "serialization failure"
            raise errors.Contention(CONTENDED.format(reason=reason)) from exc
        constraint = getattr(exc, "constraint_name", None)
        message = CALLER_WORDS.get(constraint or "") or str(getattr(exc, "message", None) or exc)
        raise kind(message, details=_details(kind, exc)) from exc
    except _CONNECTION_ERRORS as exc:
        raise errors.DatabaseUnavailable(UNAVAILABLE) from exc


def _details(kind: type[errors.ServiceError], exc: asyncpg.PostgresError) -> Any:
    """What SQL tells programs in its DETAIL, as JSON (an idempotency conflict's job and fields)."""
    if kind is not errors.IdempotencyConflict:
        return None
    try:
        return json.loads(getattr(exc, "detail", None) or "null")
    except ValueError:
        return None


def _job(record: asyncpg.Record) -> Job:
    return Job.model_validate(dict(record.items()))


def _jobs(records: list[asyncpg.Record]) -> list[Job]:
    return JOB_LIST.validate_python([dict(r.items()) for r in records])


def _ids_only(depends_on: list[int | str] | None) -> list[int] | None:
    if depends_on and any(isinstance(ref, str) for ref in depends_on):
        raise errors.InvalidArgument(
            'depends_on: "$N" references name jobs of the same batch: create them together (create_jobs)'
        )
    return [int(ref) for ref in depends_on] if depends_on else None


def _filter_args(f: JobFilter) -> dict[str, Any]:
    return {
        "p_owner_service": f.owner_service,
        "p_owner_ref": f.owner_ref,
        "p_task_type": f.task_type,
        "p_model_profile": f.model_profile,
        "p_statuses": [str(s) for s in f.status] if f.status else None,
        "p_created_after": f.created_after,
        "p_created_before": f.created_before,
    }


def _webhook(row: dict[str, Any], *, secret: str | None) -> Webhook:
    """An endpoint as answers show it: its URL's userinfo and query values masked (they may be
    credentials), the secret only where given."""
    return Webhook.model_validate(row | {"url": mask_url_values(row["url"]), "secret": secret})


def _call(function: str, args: dict[str, Any], select: str = "*") -> tuple[str, list[Any]]:
    """SELECT from an SQL API function with named arguments ($n placeholders)."""
    names = [name for name, value in args.items() if value is not None]
    params = ", ".join(f"{name} => ${i}" for i, name in enumerate(names, 1))
    return f"SELECT {select} FROM aiservice.{function}({params}) r", [args[n] for n in names]


T = TypeVar("T")


class JobStore:
    """``contention_retries``: how many more times a call is made when PostgreSQL rolled it back for
    a deadlock or a serialization failure (each call is one statement in its own transaction, so a
    rolled-back call changed nothing); after that the caller gets errors.Contention (HTTP 503).

    ``schema``: with a gate, calls are refused (errors.SchemaMismatch, HTTP 503) while its last
    reading found the database's schema wrong, and a call failing on a missing object has it read again."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        contention_retries: int = 2,
        schema: SchemaGate | None = None,
        cooldown_max: timedelta | None = None,
    ) -> None:
        self.pool = pool
        self.contention_retries = contention_retries
        self.schema = schema
        # fail_job's bound on a profile's cool-down (COOLDOWN_MAX); None: the SQL default.
        self.cooldown_max = cooldown_max

    @property
    def schema_state(self) -> SchemaState | None:
        """The last reading of the schema's version (None without a gate, or before the first)."""
        return self.schema.state if self.schema is not None else None

    async def schema_ready(self) -> None:
        """Return at once when the schema is right (no query); otherwise once it is (loops wait here)."""
        if self.schema is not None and not self.schema.ok:
            await self.schema.wait_ready()

    async def _fetch(self, function: str, args: dict[str, Any], select: str = "*") -> list[asyncpg.Record]:
        sql, values = _call(function, args, select)
        return await self._retrying(lambda: self.pool.fetch(sql, *values))

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        if self.schema is not None:
            self.schema.require()
        for retry in range(self.contention_retries + 1):
            try:
                async with translate_errors():
                    return await attempt()
            except asyncpg.PostgresError as exc:  # one the error tree does not map
                if self.schema is not None:
                    await self.schema.missing_object(exc)
                raise
            except errors.Contention:
                if retry == self.contention_retries:
                    raise
                log.info("retrying a call that PostgreSQL rolled back for contention (retry %d)", retry + 1)
                await asyncio.sleep(random.uniform(0.01, 0.05) * (retry + 1))  # jitter
        raise AssertionError("unreachable")

    async def _one(self, function: str, args: dict[str, Any]) -> Job:
        (row,) = await self._fetch(function, args)
        return _job(row)

    async def create_job(self, spec: JobCreate) -> tuple[Job, bool]:
        (row,) = await self._fetch(
            "create_job",
            {
                "p_owner_service": spec.owner_service,
                "p_owner_ref": spec.owner_ref,
                "p_task_type": spec.task_type,
                "p_model_profile": spec.model_profile,
                "p_input": spec.input,
                "p_priority": spec.priority,
                "p_run_at": spec.run_at,
                "p_max_attempts": spec.max_attempts,
                "p_idempotency_key": spec.idempotency_key,
                "p_depends_on": _ids_only(spec.depends_on),
            },
            _JOB_AND_CREATED,
        )
        created = row["created"]
        return _job(row), bool(created)

    async def create_jobs(
        self, jobs: Sequence[JobCreate | BatchJob], defaults: JobDefaults | None = None
    ) -> list[tuple[Job, bool]]:
        """Create the jobs in order; a field a job leaves out (or gives as null) comes from ``defaults``,
        which create_jobs applies (p_defaults), and then from create_job's own defaults."""
        docs = JOB_SPECS.dump_python(list(jobs), mode="json", exclude_none=True, exclude_unset=True)
        args: dict[str, Any] = {"p_jobs": docs}
        if defaults is not None:
            args["p_defaults"] = defaults.model_dump(mode="json", exclude_none=True)
        rows = await self._fetch("create_jobs", args, _JOB_AND_CREATED)
        return list(zip(_jobs(rows), (bool(r["created"]) for r in rows), strict=True))

    async def get_job(self, job_id: int) -> Job:
        return await self._one("get_job", {"p_id": job_id})

    async def list_jobs(
        self,
        f: JobFilter,
        *,
        before_id: int | None,
        limit: int,
        batch_ids: list[int] | None = None,
        ids: list[int] | None = None,
        error_category: str | None = None,
    ) -> list[Job]:
        args = _filter_args(f) | {"p_before_id": before_id, "p_limit": limit, "p_batch_ids": batch_ids, "p_ids": ids}
        return _jobs(await self._fetch("list_jobs", args | {"p_error_category": error_category}))

    async def list_dependencies(self, job_id: int, *, after_id: int | None, limit: int) -> Dependencies:
        """The jobs ``job_id`` depends on, and a page of those that depend on it (ids after ``after_id``)."""
        (row,) = await self._fetch("list_dependencies", {"p_id": job_id, "p_after_id": after_id, "p_limit": limit})
        return Dependencies.model_validate(row[0])

    async def finished(self, ids: list[int]) -> list[Job]:
        """Those of ``ids`` that are completed, failed or cancelled."""
        args = {"p_ids": ids, "p_statuses": [s.value for s in FINISHED]}
        return _jobs(await self._fetch("list_jobs", args | {"p_limit": len(ids)}))

    async def list_job_statuses(self, ids: list[int]) -> dict[int, str]:
        """The status of each of ``ids`` that exists (list_jobs, two columns only): waiters read
        these often, for many ids at once, and need no more."""
        rows = await self._fetch("list_jobs", {"p_ids": ids, "p_limit": len(ids)}, "id, status::text")
        return {row["id"]: row["status"] for row in rows}

    async def get_batch(self, batch_id: int) -> Batch:
        (row,) = await self._fetch("get_batch", {"p_id": batch_id})
        return Batch.model_validate(row[0])

    async def list_batches(self, owner_service: str | None, *, before_id: int | None, limit: int) -> list[Batch]:
        args = {"p_owner_service": owner_service, "p_before_id": before_id, "p_limit": limit}
        return [Batch.model_validate(r[0]) for r in await self._fetch("list_batches", args)]

    async def cancel_batch(self, batch_id: int) -> Batch:
        (row,) = await self._fetch("cancel_batch", {"p_id": batch_id})
        return Batch.model_validate(row[0])

    async def set_webhook(
        self, owner_service: str, url: str, secret: str, *, events: Sequence[str] | None, rotate: bool
    ) -> Webhook:
        args = {"p_owner_service": owner_service, "p_url": url, "p_secret": secret, "p_events": events and list(events)}
        (row,) = await self._fetch("set_webhook", args | {"p_rotate": rotate}, "(r.hook).*, r.secret_shown")
        hook = dict(row)
        return _webhook(hook, secret=hook["secret"] if hook["secret_shown"] else None)

    async def list_webhooks(self) -> list[Webhook]:
        rows = await self._retrying(lambda: self.pool.fetch("SELECT * FROM aiservice.webhooks ORDER BY owner_service"))
        return [_webhook(dict(r), secret=None) for r in rows]

    async def delete_webhook(self, owner_service: str) -> None:
        await self._fetch("delete_webhook", {"p_owner_service": owner_service})

    async def claim_deliveries(
        self, limit: int, lease: timedelta, per_endpoint: int | None = None, in_flight: Mapping[str, int] | None = None
    ) -> list[asyncpg.Record]:
        """Up to ``limit`` due deliveries, at most ``per_endpoint`` (default: ``limit``) of an endpoint
        counting the caller's ``in_flight`` ones (by owner_service): claim_deliveries_v2."""
        in_flight = in_flight or {}
        owners = list(in_flight)
        args = {"p_limit": limit, "p_lease": lease, "p_per_endpoint": per_endpoint or limit}
        args |= {"p_busy_owners": owners, "p_busy_counts": [in_flight[o] for o in owners]}
        return await self._fetch("claim_deliveries_v2", args)

    async def record_delivery(self, delivery_id: int, status: int | None, error: str | None, max_age: timedelta) -> str:
        args = {"p_id": delivery_id, "p_status": status, "p_error": error, "p_max_age": max_age}
        (row,) = await self._fetch("record_delivery", args)
        return str(row[0])

    async def list_deliveries(
        self, owner_service: str, *, status: str | None, before_id: int | None, limit: int
    ) -> list[Delivery]:
        args = {"p_owner_service": owner_service, "p_status": status, "p_before_id": before_id, "p_limit": limit}
        # The sender records errors masked; the endpoint's URL masks what an earlier release recorded.
        url = "(SELECT w.url FROM aiservice.webhooks w WHERE w.owner_service = r.owner_service) AS endpoint_url"
        deliveries = []
        for row in await self._fetch("list_deliveries", args, f"r.*, {url}"):
            delivery = dict(row)
            endpoint, error = delivery.pop("endpoint_url"), delivery["last_error"]
            if endpoint and error:
                delivery["last_error"] = redact_url(error, endpoint)
            deliveries.append(Delivery.model_validate(delivery))
        return deliveries

    async def retry_delivery(self, owner_service: str, delivery_id: int) -> Delivery:
        (row,) = await self._fetch("retry_delivery", {"p_owner_service": owner_service, "p_id": delivery_id})
        return Delivery.model_validate(dict(row))

    async def claim_jobs(
        self,
        worker_id: str,
        limit: int,
        *,
        lease_timeout: timedelta,
        task_types: list[str] | None = None,
        model_profiles: list[str] | None = None,
        max_dependency_bytes: int | None = None,
    ) -> list[ClaimedJob]:
        """``max_dependency_bytes`` bounds the dependencies' results in the answer (None: SQL's default);
        a dependency whose result was left out has ``result_omitted`` (read it with get_job)."""
        args = {
            "p_worker_id": worker_id,
            "p_limit": limit,
            "p_task_types": task_types,
            "p_model_profiles": model_profiles,
            "p_lease_timeout": lease_timeout,
            "p_max_dependency_bytes": max_dependency_bytes,
        }
        rows = await self._fetch("claim_jobs_v2", args, "(r.job).*, r.dependencies")
        return CLAIMED_LIST.validate_python([dict(r.items()) for r in rows])

    async def heartbeat_job(
        self, job_id: int, worker_id: str, *, lease_timeout: timedelta, lease_token: UUID | None = None
    ) -> datetime:
        args = {
            "p_id": job_id,
            "p_worker_id": worker_id,
            "p_lease_timeout": lease_timeout,
            "p_lease_token": lease_token,
        }
        (row,) = await self._fetch("heartbeat_job", args)
        expires: datetime = row[0]
        return expires

    async def complete_job(
        self, job_id: int, worker_id: str, result: dict[str, Any], *, lease_token: UUID | None = None
    ) -> Job:
        args = {"p_id": job_id, "p_worker_id": worker_id, "p_result": result, "p_lease_token": lease_token}
        return await self._one("complete_job", args)

    async def complete_jobs(
        self, worker_id: str, completions: Iterable[tuple[int, UUID | None, dict[str, Any]]]
    ) -> dict[int, str]:
        """Complete many running jobs of ``worker_id`` in one transaction.

        ``completions`` holds (job id, lease token or None, result). Returns each id's outcome:
        "completed", or "lease_lost" / "not_found" for a job left unchanged; fencing is per job,
        as in ``complete_job``, and a refused job does not stop the others."""
        ids: list[int] = []
        tokens: list[UUID | None] = []
        results: list[dict[str, Any]] = []
        for job_id, token, result in completions:
            ids.append(job_id)
            tokens.append(token)
            results.append(result)
        args = {"p_worker_id": worker_id, "p_ids": ids, "p_results": results, "p_lease_tokens": tokens}
        return {int(r["id"]): str(r["outcome"]) for r in await self._fetch("complete_jobs", args)}

    async def fail_job(
        self,
        job_id: int,
        worker_id: str,
        category: str,
        message: str | None,
        *,
        retryable: bool | None = None,
        retry_after: timedelta | None = None,
        lease_token: UUID | None = None,
        cooldown_max: timedelta | None = None,
    ) -> Job:
        """``cooldown_max`` bounds the cool-down of the job's profile after a rate_limited failure
        (default: the store's, else SQL's)."""
        args: dict[str, Any] = {
            "p_id": job_id,
            "p_worker_id": worker_id,
            "p_error_category": category,
            "p_error_message": message,
            "p_retryable": retryable,
            "p_retry_after": retry_after,
            "p_lease_token": lease_token,
        }
        bound = self.cooldown_max if cooldown_max is None else cooldown_max
        if bound is not None:
            args["p_cooldown_max"] = bound
        return await self._one("fail_job", args)

    async def release_job(self, job_id: int, worker_id: str, *, lease_token: UUID | None = None) -> Job:
        return await self._one("release_job", {"p_id": job_id, "p_worker_id": worker_id, "p_lease_token": lease_token})

    async def retry_job(self, job_id: int) -> Job:
        return await self._one("retry_job", {"p_id": job_id})

    async def cancel_job(self, job_id: int) -> Job:
        return await self._one("cancel_job", {"p_id": job_id})

    async def retry_jobs(self, selection: JobSelection) -> list[int]:
        return await self._ids("retry_jobs", selection)

    async def cancel_jobs(self, selection: JobSelection) -> list[int]:
        return await self._ids("cancel_jobs", selection)

    async def _ids(self, function: str, selection: JobSelection) -> list[int]:
        args = _filter_args(selection) | {"p_ids": selection.ids, "p_all": selection.all}
        return sorted(int(r[0]) for r in await self._fetch(function, args))

    async def expire_leases(self) -> list[Job]:
        return _jobs(await self._fetch("expire_leases", {}))

    async def stats(self, window: timedelta = timedelta(hours=1)) -> Stats:
        (row,) = await self._fetch("stats", {"p_window": window})
        return Stats.model_validate(row[0])

    async def purge_jobs(self, older_than: timedelta, limit: int = 10_000) -> int:
        (row,) = await self._fetch("purge_jobs", {"p_older_than": older_than, "p_limit": limit})
        return int(row[0])

    async def compact_counts(self) -> int:
        (row,) = await self._fetch("compact_counts", {})
        return int(row[0])

    async def list_limits(self) -> list[Limit]:
        return [Limit.model_validate(dict(r)) for r in await self._fetch("list_limits", {})]

    async def set_limit(self, scope: str, name: str, fields: dict[str, Any]) -> Limit:
        (row,) = await self._fetch("set_limit", {"p_scope": scope, "p_name": name, "p_fields": fields})
        return Limit.model_validate(dict(row))

    async def delete_limit(self, scope: str, name: str) -> None:
        await self._fetch("delete_limit", {"p_scope": scope, "p_name": name})

    async def maintain(self, retention: timedelta | None, every: timedelta = timedelta(0)) -> dict[str, Any]:
        (row,) = await self._fetch("maintain", {"p_retention": retention, "p_every": every})
        return dict(row[0])

    async def statuses(self) -> list[str]:
        """The labels of the SQL enum, for the test that keeps JobStatus equal to it."""
        async with translate_errors():
            rows = await self.pool.fetch("SELECT unnest(enum_range(NULL::aiservice.job_status))::text")
        return [r[0] for r in rows]

    async def ping(self) -> None:
        async with translate_errors():
            await self.pool.fetchval("SELECT 1", timeout=2.0)


__all__ = ["JobStatus", "JobStore", "translate_errors"]
