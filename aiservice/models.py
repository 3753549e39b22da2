"""Request and response shapes, shared by the HTTP API, the repository and the worker."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, field_validator


class JobStatus(StrEnum):
    """Kept equal to the SQL enum aiservice.job_status by a test."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


def _no_nul(value: str) -> str:
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


Name = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(_no_nul)]
Ref = Annotated[str, StringConstraints(min_length=1, max_length=500), AfterValidator(_no_nul)]
Category = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
Priority = Annotated[int, Field(ge=-1000, le=1000)]
MaxAttempts = Annotated[int, Field(ge=1, le=100)]
# Job ids are bigint in SQL.
JobId = Annotated[int, Field(ge=1, le=2**63 - 1)]
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


class JobDefaults(Strict):
    """Fields a batch applies to every job that does not set them."""

    owner_service: Name | None = None
    owner_ref: Ref | None = None
    task_type: Name | None = None
    model_profile: Name | None = None
    input: Payload | None = None
    priority: Priority | None = None
    run_at: Timestamp | None = None
    max_attempts: MaxAttempts | None = None


class BatchJob(JobDefaults):
    idempotency_key: Ref | None = None


class JobCreate(Strict):
    owner_service: Name
    owner_ref: Ref
    task_type: Name
    model_profile: Name
    input: Payload = Field(default_factory=dict)
    priority: Priority = 0
    run_at: Timestamp | None = None
    max_attempts: MaxAttempts = 3
    idempotency_key: Ref | None = None


class BatchCreate(Strict):
    defaults: JobDefaults = Field(default_factory=JobDefaults)
    jobs: list[BatchJob] = Field(min_length=1, max_length=50_000)

    def merged(self) -> list[JobCreate]:
        """Each job with the defaults applied, validated as a single create (in one pass)."""
        base = self.defaults.model_dump(exclude_none=True)
        return JOB_CREATES.validate_python([base | job.model_dump(exclude_none=True) for job in self.jobs])


class JobFilter(Strict):
    owner_service: Name | None = None
    owner_ref: Ref | None = None
    task_type: Name | None = None
    model_profile: Name | None = None
    status: list[JobStatus] | None = None
    created_after: Timestamp | None = None
    created_before: Timestamp | None = None


class ListQuery(JobFilter):
    limit: int = Field(default=50, ge=1, le=500)
    cursor: JobId | None = Field(default=None, description="next_cursor of the previous page")


class JobPage(BaseModel):
    jobs: list[Job]
    next_cursor: str | None


class Jobs(BaseModel):
    jobs: list[Job]


class FilterAction(JobFilter):
    """Retry or cancel by filter. An empty filter is refused unless all is true."""

    ids: list[JobId] | None = Field(default=None, max_length=50_000)
    all: bool = False


class Affected(BaseModel):
    count: int
    ids: list[int]


class ClaimRequest(Strict):
    worker_id: Name
    limit: int = Field(default=1, ge=1, le=1000)
    task_types: list[Name] | None = None
    model_profiles: list[Name] | None = None
    lease_timeout: float | None = Field(
        default=None, gt=0, le=7 * 24 * 3600, description="seconds; WORKER_LEASE_TIMEOUT when omitted"
    )


class CompleteRequest(Strict):
    worker_id: Name
    result: Payload
    lease_token: UUID | None = None


class FailRequest(Strict):
    worker_id: Name
    error_category: Category
    error_message: str | None = Field(default=None, max_length=4000)
    retryable: bool | None = None
    retry_after: float | None = Field(default=None, ge=0, le=7 * 24 * 3600, description="seconds")
    lease_token: UUID | None = None

    @field_validator("error_message")
    @classmethod
    def _message_text(cls, value: str | None) -> str | None:
        return None if value is None else _no_nul(value)

    def retry_delay(self) -> timedelta | None:
        return None if self.retry_after is None else timedelta(seconds=self.retry_after)


class HeartbeatRequest(Strict):
    worker_id: Name
    lease_timeout: float | None = Field(default=None, gt=0, le=7 * 24 * 3600, description="seconds")
    lease_token: UUID | None = None


class Lease(BaseModel):
    id: int
    lease_expires_at: datetime


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


class Stats(BaseModel):
    window_seconds: float
    by_status: list[StatusCount]
    errors: list[ErrorCount] = Field(description="terminal failures by category over the last day")
    errors_last_hour: list[ErrorCount]
    oldest_pending_age_seconds: float | None
    oldest_pending: list[PendingAge]
    completed_per_minute: Throughput
    latency: list[Latency]
    running_by_worker: list[WorkerLoad]


class StatsQuery(Strict):
    window: Annotated[float, Field(gt=0, le=7 * 24 * 3600, description="seconds, for latency percentiles")] = 3600


class ProviderReport(BaseModel):
    """One provider's check; configured providers add reachable, latency_ms, error and more."""

    model_config = ConfigDict(extra="allow")
    configured: bool


class ProvidersStatus(BaseModel):
    checked_at: datetime
    providers: dict[str, ProviderReport]


class InfraReport(BaseModel):
    """The sidecar's telemetry (sources: gpu, containers, vllm, whisperx) when configured."""

    model_config = ConfigDict(extra="allow")
    configured: bool


class Health(BaseModel):
    status: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail


# Whole lists validated and dumped in one call each: thousands of jobs per batch, no Python loop.
JOB_LIST = TypeAdapter(list[Job])
JOB_CREATES = TypeAdapter(list[JobCreate])
