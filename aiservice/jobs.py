"""The job domain: what a job is, how one is specified, which jobs an operation selects, statistics.

The repository (aiservice/db/jobs.py) takes and returns these types; the HTTP API and the worker
share them. HTTP request and response bodies live in aiservice/api/schemas.py."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter


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


def _utc(value: datetime) -> datetime:
    # Naive times are UTC; a time that cannot be expressed in UTC would only fail later, in the driver.
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range") from None


# The response serializer stops near 255 levels; refuse what could be stored but not read back.
MAX_JSON_DEPTH = 100


def _children(value: Any) -> Iterable[Any]:
    if isinstance(value, dict):
        return value.values()
    return value if isinstance(value, list) else ()


def _not_too_deep(value: dict[str, Any]) -> dict[str, Any]:
    level: list[Any] = [value]
    for _ in range(MAX_JSON_DEPTH):
        level = [child for item in level for child in _children(item) if isinstance(child, dict | list)]
        if not level:
            return value
    raise ValueError(f"must not nest objects and arrays more than {MAX_JSON_DEPTH} levels deep")


Name = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(no_nul)]
Ref = Annotated[str, StringConstraints(min_length=1, max_length=500), AfterValidator(no_nul)]
Category = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
Priority = Annotated[int, Field(ge=-1000, le=1000)]
MaxAttempts = Annotated[int, Field(ge=1, le=100)]
# Job ids are bigint in SQL.
JobId = Annotated[int, Field(ge=1, le=2**63 - 1)]
# "$N": the N-th job (0-based) of the same create_jobs call.
BatchRef = Annotated[str, StringConstraints(pattern=r"^\$[0-9]{1,9}$")]
Timestamp = Annotated[datetime, AfterValidator(_utc)]
Payload = Annotated[dict[str, Any], AfterValidator(_not_too_deep)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    id: int
    task_type: str
    model_profile: str
    status: JobStatus
    result: dict[str, Any] | None


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


class JobFilter(Strict):
    """Which jobs list_jobs returns; every field given must match."""

    owner_service: Name | None = None
    owner_ref: Ref | None = None
    task_type: Name | None = None
    model_profile: Name | None = None
    status: list[JobStatus] | None = None
    created_after: Timestamp | None = None
    created_before: Timestamp | None = None


class JobSelection(JobFilter):
    """Which jobs retry_jobs or cancel_jobs act on: a filter and/or ids. An empty selection is
    refused unless all is true."""

    ids: list[JobId] | None = Field(default=None, max_length=50_000)
    all: bool = False


class StatusCount(BaseModel):
    status: JobStatus
    task_type: str
    model_profile: str
    count: int


class ErrorCount(BaseModel):
    error_category: str | None
    count: int


class PendingAge(BaseModel):
    task_type: str
    age_seconds: float


class Throughput(BaseModel):
    last_5m: float
    last_60m: float


class Latency(BaseModel):
    """Percentiles over the newest jobs (at most 5,000) finished within the window."""

    task_type: str
    count: int
    wait_p50_ms: float
    wait_p95_ms: float
    run_p50_ms: float
    run_p95_ms: float


class WorkerLoad(BaseModel):
    worker_id: str
    count: int


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


WebhookEvent = Literal["job.finished", "batch.finished"]


class Webhook(BaseModel):
    """An owner_service's endpoint; the secret is shown only when created or rotated."""

    owner_service: str
    url: str
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


class Limit(BaseModel):
    """A capacity limit with its live usage, as aiservice.list_limits() returns it."""

    scope: LimitScope
    name: str
    paused: bool
    max_running: int | None
    max_per_minute: int | None
    max_tokens_per_minute: int | None
    weight: int
    cooldown: bool = Field(description="whether rate_limited failures with a retry_after pause the profile")
    cooldown_until: datetime | None = Field(description="the profile is held until then (read-only)")
    running: int
    started_last_minute: int
    tokens_last_minute: int


class Stats(BaseModel):
    """What the SQL function stats returns."""

    window_seconds: float
    by_status: list[StatusCount]
    errors: list[ErrorCount] = Field(description="terminal failures by category over the last day")
    errors_last_hour: list[ErrorCount]
    oldest_pending_age_seconds: float | None
    oldest_pending: list[PendingAge]
    completed_per_minute: Throughput
    latency: list[Latency]
    running_by_worker: list[WorkerLoad]
    limits: list[Limit]


# Whole lists validated and dumped in one call each: thousands of jobs per batch, no Python loop.
JOB_LIST = TypeAdapter(list[Job])
CLAIMED_LIST = TypeAdapter(list[ClaimedJob])
JOB_CREATES = TypeAdapter(list[JobCreate])
