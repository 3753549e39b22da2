"""The job domain: what a job is, how one is specified, which jobs an operation selects, statistics.

The repository (aiservice/db/store.py) takes and returns these types; the HTTP API and the worker
share them. HTTP request and response bodies live in aiservice/api/schemas.py."""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    StringConstraints,
    TypeAdapter,
    model_serializer,
)

from aiservice import rules


class JobStatus(StrEnum):
    """Kept equal to the SQL enum aiservice.job_status by a test."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


def no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL; refuse it here with a clear message.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def text(value: str) -> str:
    """Text PostgreSQL can store: no NUL, no lone surrogate (JSON's "\\ud800" escape)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (a lone surrogate is not)") from None
    return no_nul(value)


def _iso(value: Any) -> Any:
    # Request bodies are strict (no "5" for 5, no 1 for true), but JSON has no datetime type: a
    # timestamp is an ISO 8601 string. Only strings are parsed here; a number stays refused.
    return _LAX_DATETIME.validate_python(value) if isinstance(value, str) else value


def _utc(value: datetime) -> datetime:
    # Naive times are UTC; a time that cannot be expressed in UTC would only fail later, in the driver.
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range") from None


# The driver (asyncpg) sends Python's earliest and latest instants as -infinity and infinity, which
# jobs.run_at refuses (jobs_run_at_finite_check). Jobs of a batch go to SQL as JSON text: they say
# the same, so that a batch answers such a run_at as a single create does.
_INFINITE = {datetime.min.replace(tzinfo=UTC): "-infinity", datetime.max.replace(tzinfo=UTC): "infinity"}


def _sql_text(value: datetime) -> str:
    return _INFINITE.get(value) or value.isoformat()


# The response serializer stops near 255 levels; refuse what could be stored but not read back.
MAX_JSON_DEPTH = 100


def _children(value: Any) -> Iterable[Any]:
    if isinstance(value, dict):
        return value.values()
    return value if isinstance(value, list) else ()


def _json_document(value: dict[str, Any]) -> dict[str, Any]:
    """Refuse what JSON cannot hold or the API could not read back: NaN and Infinity (Python's
    json module reads them, PostgreSQL's jsonb does not) and nesting beyond MAX_JSON_DEPTH."""
    level: list[Any] = [value]
    for _ in range(MAX_JSON_DEPTH):
        if any(isinstance(child, float) and not math.isfinite(child) for item in level for child in _children(item)):
            raise ValueError("must not hold NaN or Infinity (they are not JSON)")
        level = [child for item in level for child in _children(item) if isinstance(child, dict | list)]
        if not level:
            return value
    raise ValueError(f"must not nest objects and arrays more than {MAX_JSON_DEPTH} levels deep")


_LAX_DATETIME = TypeAdapter(datetime)

Name = Annotated[str, StringConstraints(min_length=1, max_length=rules.NAME_LENGTH), AfterValidator(no_nul)]
Ref = Annotated[str, StringConstraints(min_length=1, max_length=rules.REF_LENGTH), AfterValidator(no_nul)]
Category = Annotated[str, StringConstraints(pattern=rules.CATEGORY_PATTERN)]
Priority = Annotated[int, Field(ge=rules.PRIORITY_MIN, le=rules.PRIORITY_MAX)]
MaxAttempts = Annotated[int, Field(ge=rules.MAX_ATTEMPTS_MIN, le=rules.MAX_ATTEMPTS_MAX)]
# Job ids are bigint in SQL.
JobId = Annotated[int, Field(ge=1, le=2**63 - 1)]
# "$N": the N-th job (0-based) of the same create_jobs call.
BatchRef = Annotated[str, StringConstraints(pattern=r"^\$[0-9]{1,9}$")]
Timestamp = Annotated[
    datetime, BeforeValidator(_iso), AfterValidator(_utc), PlainSerializer(_sql_text, when_used="json")
]
Payload = Annotated[dict[str, Any], AfterValidator(_json_document)]
# Enum values arrive as JSON strings: strict mode would want the Python enum itself.
Status = Annotated[JobStatus, Field(strict=False)]
LeaseToken = Annotated[UUID, Field(strict=False)]


class Closed(BaseModel):
    """Unknown fields are refused. Values are coerced: query strings carry every value as text."""

    model_config = ConfigDict(extra="forbid")


class Strict(Closed):
    """A JSON request body: unknown fields are refused and nothing is coerced ("5" is not 5, 1 and
    "yes" are not true, true is not 1); timestamps are ISO 8601 strings."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Job(BaseModel):
    id: int
    owner_service: str
    owner_ref: str
    task_type: str
    model_profile: str
    input: dict[str, Any]
    result: dict[str, Any] | None
    status: JobStatus
    priority: int
    run_at: datetime
    attempts: int
    max_attempts: int
    error_category: str | None
    error_message: str | None
    worker_id: str | None
    lease_token: UUID | None
    lease_expires_at: datetime | None
    idempotency_key: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    batch_id: int | None = Field(description="the batch that created the job (POST /jobs/batch)")
    blocked: bool = Field(description="pending, waiting for its dependencies (never claimed while blocked)")


class Dependency(BaseModel):
    """A claimed job's dependency. Element N of the list is the dependency at position N."""

    id: int
    task_type: str | None = Field(description="null when the job no longer exists (deleted)")
    model_profile: str | None
    status: JobStatus | None = Field(description="null when the job no longer exists (deleted)")
    result: dict[str, Any] | None
    result_omitted: bool = Field(
        default=False,
        description="left out to keep the claim's answer within its size bound: read it with GET /jobs/{id}",
    )
    deleted: bool = Field(default=False, description="the job no longer exists")


class ClaimedJob(Job):
    dependencies: list[Dependency] | None = Field(
        default=None, description="the jobs it depends on, in the order given at creation (null when none)"
    )


class JobCreate(Strict):
    """A job to create (create_job, create_jobs)."""

    owner_service: Name
    owner_ref: Ref
    task_type: Name
    model_profile: Name
    input: Payload = Field(default_factory=dict)
    priority: Priority = 0
    run_at: Timestamp | None = None
    max_attempts: MaxAttempts = 3
    idempotency_key: Ref | None = None
    depends_on: list[JobId | BatchRef] | None = Field(
        default=None, max_length=100, description='job ids, or "$N" for the N-th job (0-based) of the same batch'
    )


# What a job of a batch must have, from its own fields or from the batch's defaults.
REQUIRED_FIELDS = tuple(name for name, field in JobCreate.model_fields.items() if field.is_required())


class JobDefaults(Strict):
    """Fields a batch applies to every job that does not set them (create_jobs' p_defaults)."""

    owner_service: Name | None = None
    owner_ref: Ref | None = None
    task_type: Name | None = None
    model_profile: Name | None = None
    input: Payload | None = None
    priority: Priority | None = None
    run_at: Timestamp | None = None
    max_attempts: MaxAttempts | None = None


class BatchJob(JobDefaults):
    """One job of a batch: a field left out or null takes the batch's default, then create_job's."""

    idempotency_key: Ref | None = None
    depends_on: list[JobId | BatchRef] | None = Field(
        default=None, max_length=100, description='job ids, or "$N" for the N-th job (0-based) of this batch'
    )


class JobFilter(Closed):
    """Which jobs list_jobs returns; every field given must match."""

    owner_service: Name | None = None
    owner_ref: Ref | None = None
    task_type: Name | None = None
    model_profile: Name | None = None
    status: list[Status] | None = None
    created_after: Timestamp | None = None
    created_before: Timestamp | None = None


class JobSelection(JobFilter):
    """Which jobs retry_jobs or cancel_jobs act on: a filter and/or ids. An empty selection is
    refused unless all is true."""

    model_config = Strict.model_config

    ids: list[JobId] | None = Field(default=None, max_length=50_000)
    all: bool = False


class StatusCount(BaseModel):
    """Jobs in the table in one status, of one task_type and model_profile."""

    status: JobStatus = Field(description="the jobs' status")
    task_type: str = Field(description="the jobs' task_type")
    model_profile: str = Field(description="the jobs' model_profile")
    count: int = Field(description="jobs now in this status (never zero: such rows are left out)")


class StatusTotals(BaseModel):
    """Jobs in the table by status, all task types and profiles together; every status is present."""

    pending: int = Field(description="waiting to be claimed, now or at run_at")
    running: int = Field(description="claimed by a worker, under a lease")
    completed: int = Field(description="finished with a result")
    failed: int = Field(description="finished with a failure that is not retried")
    cancelled: int = Field(description="cancelled before they finished")


class CreatedCount(BaseModel):
    """Jobs created of one task_type and model_profile, through any door (HTTP or the SQL API)."""

    task_type: str = Field(description="the jobs' task_type")
    model_profile: str = Field(description="the jobs' model_profile")
    count: int = Field(
        description="created since counting began (jobs kept at the upgrade that added it, and every one since); "
        "deleting jobs does not lower it"
    )


class ErrorCount(BaseModel):
    """Terminal failures of one category."""

    error_category: str | None = Field(description="the failure category; null for a failure without one")
    count: int = Field(description="jobs that failed (terminally) with this category")


class PendingAge(BaseModel):
    """The oldest claimable job of one task type."""

    task_type: str = Field(description="the jobs' task_type")
    age_seconds: float = Field(description="how long the oldest claimable job of this task type has been due")


class Throughput(BaseModel):
    """Jobs completed per minute, averaged over the trailing 5 and 60 minutes."""

    last_5m: float = Field(description="completions per minute over the last 5 minutes")
    last_60m: float = Field(description="completions per minute over the last 60 minutes")


class Latency(BaseModel):
    """Percentiles over the newest jobs (at most 5,000) finished within the window."""

    task_type: str = Field(description="the jobs' task_type")
    count: int = Field(description="finished jobs the percentiles are computed from")
    wait_p50_ms: float = Field(description="median time from creation to the start of the last attempt")
    wait_p95_ms: float = Field(description="95th percentile of that wait")
    run_p50_ms: float = Field(description="median time from the start of the last attempt to its end")
    run_p95_ms: float = Field(description="95th percentile of that run time")


class WorkerLoad(BaseModel):
    """Running jobs of one worker."""

    worker_id: str = Field(description="the worker_id given to claim")
    count: int = Field(description="jobs this worker runs now")


FINISHED = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


class BatchCounts(BaseModel):
    total: int
    pending: int
    running: int
    completed: int
    failed: int
    cancelled: int


class Batch(BaseModel):
    """The jobs one create_jobs call made, with counts kept by SQL (aiservice.get_batch)."""

    id: int
    owner_service: str = Field(description="the owner_service of the batch's first job")
    created_at: datetime
    finished_at: datetime | None
    status: Literal["in_progress", "finished"]
    counts: BatchCounts


class JobLink(BaseModel):
    """A job that another one depends on, or that depends on it."""

    id: int
    task_type: str
    model_profile: str
    status: JobStatus


class Dependencies(BaseModel):
    """What a job waits for and what waits for it (aiservice.list_dependencies)."""

    id: int = Field(description="the job")
    depends_on: list[JobLink] = Field(description="the jobs it depends on, in the order given at creation")
    dependents: list[JobLink] = Field(description="jobs that depend on it, by id (one page of them)")


WebhookEvent = Literal["job.finished", "batch.finished"]


class Webhook(BaseModel):
    """An owner_service's endpoint; the secret is shown only when created or rotated."""

    owner_service: str
    url: str = Field(description="userinfo and query values shown as ***: they may be credentials")
    events: list[WebhookEvent]
    disabled_at: datetime | None = Field(description="set when the receiver answered 410 Gone")
    created_at: datetime
    updated_at: datetime
    secret: str | None = Field(default=None, description="whsec_… signing secret, only in the answer that set it")


class Delivery(BaseModel):
    id: int
    owner_service: str
    event: WebhookEvent
    job_id: int | None
    batch_id: int | None
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime
    created_at: datetime
    delivered_at: datetime | None
    last_status: int | None = Field(description="the receiver's last HTTP status")
    last_error: str | None


class LimitScope(StrEnum):
    """Kept equal to the SQL enum aiservice.limit_scope by a test."""

    TASK_TYPE = "task_type"
    MODEL_PROFILE = "model_profile"
    OWNER_SERVICE = "owner_service"


# Fields only some scopes use (rules.LIMIT_FIELDS): a limit of another scope leaves them out.
_SCOPE_ONLY_FIELDS = frozenset({"weight", "cooldown", "cooldown_until"})


class Limit(BaseModel):
    """A capacity limit with its live usage, as aiservice.list_limits() returns it. Serialized
    with the fields its scope uses only (weight: owner_service; cooldown, cooldown_until:
    model_profile)."""

    scope: LimitScope = Field(description="what the limit applies to")
    name: str = Field(description="the task_type, model_profile or owner_service it applies to")
    paused: bool = Field(description="no job it covers is claimed while true")
    max_running: int | None = Field(description="at most this many of its jobs run at once; null: no cap")
    max_per_minute: int | None = Field(description="at most this many starts in any trailing minute; null: no cap")
    max_tokens_per_minute: int | None = Field(
        description="no claims while its jobs used this many LLM tokens in the trailing minute; null: no cap"
    )
    weight: int | None = Field(
        default=None, description="owner_service only: its share of claims under fair share (default 1)"
    )
    cooldown: bool | None = Field(
        default=None,
        description="model_profile only: whether rate_limited failures with a retry_after pause the profile",
    )
    cooldown_until: datetime | None = Field(
        default=None, description="model_profile only: the profile is held until then (read-only; null: it is not)"
    )
    running: int = Field(description="its jobs running now")
    started_last_minute: int = Field(description="its jobs started in the trailing minute")
    tokens_last_minute: int = Field(description="LLM tokens its jobs used in the trailing minute")

    @model_serializer(mode="wrap")
    def _scope_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in _SCOPE_ONLY_FIELDS.difference(rules.LIMIT_FIELDS[self.scope.value]):
            data.pop(name, None)
        return data


class MinuteCount(BaseModel):
    """Jobs that finished in one minute."""

    minute: datetime = Field(description="the start of the minute")
    completed: int = Field(description="jobs completed in that minute")
    failed: int = Field(description="jobs that failed terminally in that minute")


class Stats(BaseModel):
    """What the SQL function stats returns. Counts come from counters kept by triggers, so no figure
    scans the whole table."""

    window_seconds: float = Field(description="the window of the latency percentiles, in seconds")
    totals: StatusTotals = Field(description="jobs in the table by status, zeros included")
    by_status: list[StatusCount] = Field(
        description="jobs in the table by status, task_type and model_profile (only combinations with jobs)"
    )
    created: list[CreatedCount] = Field(
        description="jobs created by task_type and model_profile, through HTTP and the SQL API alike"
    )
    errors: list[ErrorCount] = Field(description="terminal failures by category over the last day")
    errors_last_hour: list[ErrorCount] = Field(description="terminal failures by category over the last hour")
    oldest_pending_age_seconds: float | None = Field(
        description="how long the oldest claimable job has been due; null when none is"
    )
    oldest_pending: list[PendingAge] = Field(description="the same per task_type")
    completed_per_minute: Throughput = Field(description="throughput over the trailing 5 and 60 minutes")
    per_minute: list[MinuteCount] = Field(
        description="jobs completed and terminally failed in each of the last 60 minutes (minutes with none left out)"
    )
    latency: list[Latency] = Field(description="wait and run percentiles per task_type over the window")
    running_by_worker: list[WorkerLoad] = Field(description="running jobs per worker_id")
    limits: list[Limit] = Field(description="every capacity limit with its live usage")


# Whole lists validated and dumped in one call each: thousands of jobs per batch, no Python loop.
JOB_LIST = TypeAdapter(list[Job])
CLAIMED_LIST = TypeAdapter(list[ClaimedJob])
# Both kinds of job to create in one dump: a JobCreate is complete, a BatchJob leaves to the defaults what it lacks.
JOB_SPECS = TypeAdapter(list[JobCreate | BatchJob])
