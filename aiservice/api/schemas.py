"""HTTP request and response bodies of the API, beside the domain types they carry (aiservice.jobs)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator

from aiservice.jobs import (
    JOB_CREATES,
    BatchRef,
    Category,
    ClaimedJob,
    Delivery,
    Job,
    JobCreate,
    JobFilter,
    JobId,
    JobSelection,
    Limit,
    MaxAttempts,
    Name,
    Payload,
    Priority,
    Ref,
    Strict,
    Timestamp,
    Webhook,
    WebhookEvent,
    no_nul,
)


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
    depends_on: list[JobId | BatchRef] | None = Field(
        default=None, max_length=100, description='job ids, or "$N" for the N-th job (0-based) of this batch'
    )


class BatchCreate(Strict):
    defaults: JobDefaults = Field(default_factory=JobDefaults)
    jobs: list[BatchJob] = Field(min_length=1, max_length=50_000)

    def merged(self) -> list[JobCreate]:
        """Each job with the defaults applied, validated as a single create (in one pass)."""
        base = self.defaults.model_dump(exclude_none=True)
        return JOB_CREATES.validate_python([base | job.model_dump(exclude_none=True) for job in self.jobs])


class ListQuery(JobFilter):
    batch_id: list[JobId] | None = Field(default=None, description="jobs of these batches")
    limit: int = Field(default=50, ge=1, le=500)
    cursor: JobId | None = Field(default=None, description="next_cursor of the previous page")


class JobPage(BaseModel):
    jobs: list[Job]
    next_cursor: str | None


class Jobs(BaseModel):
    jobs: list[Job]


class ClaimedJobs(BaseModel):
    jobs: list[ClaimedJob]


class BatchCreated(BaseModel):
    batch_id: int | None = Field(description="the batch of the jobs created now; null when every job was a repeat")
    jobs: list[Job]


Seconds = Annotated[float, Field(ge=0, le=60, description="seconds, at most 60")]


class WaitQuery(Strict):
    wait: Seconds = 0


class WaitRequest(Strict):
    ids: list[JobId] = Field(min_length=1, max_length=1000)
    timeout: Seconds = 30
    mode: Literal["any", "all"] = Field(default="all", description="answer when any, or all, of the jobs finished")


class WebhookSet(Strict):
    url: str = Field(pattern=r"^https?://[^\s/?#]+[^\s]*$", max_length=2000, description="http:// or https:// only")
    events: list[WebhookEvent] | None = Field(default=None, min_length=1, description="both when omitted")
    rotate_secret: bool = Field(default=False, description="issue a new signing secret (shown once)")


class Webhooks(BaseModel):
    webhooks: list[Webhook]


class DeliveryQuery(Strict):
    status: Literal["pending", "delivered", "failed"] | None = None
    limit: int = Field(default=50, ge=1, le=500)
    cursor: JobId | None = Field(default=None, description="next_cursor of the previous page")


class DeliveryPage(BaseModel):
    deliveries: list[Delivery]
    next_cursor: str | None


class FilterAction(JobSelection):
    """The body of POST /jobs/retry and /jobs/cancel. An empty filter is refused unless all is true."""


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
        return None if value is None else no_nul(value)

    def retry_delay(self) -> timedelta | None:
        return None if self.retry_after is None else timedelta(seconds=self.retry_after)


class HeartbeatRequest(Strict):
    worker_id: Name
    lease_timeout: float | None = Field(default=None, gt=0, le=7 * 24 * 3600, description="seconds")
    lease_token: UUID | None = None


class Lease(BaseModel):
    id: int
    lease_expires_at: datetime


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


class LimitChange(Strict):
    """The settable fields of a limit: a field not sent keeps its value, one sent as null is cleared."""

    model_config = ConfigDict(extra="forbid", strict=True)
    paused: bool | None = None
    max_running: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    max_per_minute: Annotated[int, Field(ge=0, le=100_000_000)] | None = None
    max_tokens_per_minute: Annotated[int, Field(ge=0, le=1_000_000_000_000)] | None = None
    weight: Annotated[int, Field(ge=1, le=10_000, description="owner_service: share of claims")] | None = None
    cooldown: bool | None = Field(default=None, description="false: rate limits do not pause the whole profile")
    cooldown_until: None = Field(default=None, description="read-only; null ends a cool-down early")


class Limits(BaseModel):
    limits: list[Limit]
