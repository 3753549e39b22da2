"""HTTP request and response bodies of the API, beside the domain types they carry (aiservice.jobs)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import InitErrorDetails

from aiservice import rules
from aiservice.jobs import (
    REQUIRED_FIELDS,
    Batch,
    BatchJob,
    Category,
    ClaimedJob,
    Closed,
    Delivery,
    Dependencies,
    Job,
    JobDefaults,
    JobFilter,
    JobId,
    JobSelection,
    LeaseToken,
    Limit,
    Name,
    Payload,
    Strict,
    Webhook,
    WebhookEvent,
    text,
)

# Seconds, as HTTP bodies give durations; SQL's bounds (aiservice.rules).
_MAX_LEASE_SECONDS = rules.MAX_LEASE_TIMEOUT.total_seconds()
_MAX_RETRY_AFTER_SECONDS = rules.MAX_RETRY_AFTER.total_seconds()


class BatchCreate(Strict):
    """The body of POST /jobs/batch: the defaults go to create_jobs as p_defaults, the jobs as p_jobs."""

    defaults: JobDefaults = Field(default_factory=JobDefaults)
    jobs: list[BatchJob] = Field(min_length=1, max_length=50_000)

    def incomplete(self) -> ValidationError | None:
        """A job that lacks a required field the defaults do not supply either, named by its index."""
        missing = [name for name in REQUIRED_FIELDS if getattr(self.defaults, name) is None]
        errors = [
            InitErrorDetails(type="missing", loc=("jobs", index, name), input=None)
            for index, job in enumerate(self.jobs)
            for name in missing
            if getattr(job, name) is None
        ]
        return ValidationError.from_exception_data("BatchCreate", errors) if errors else None


class ListQuery(JobFilter):  # from the query string: values arrive as text
    batch_id: list[JobId] | None = Field(default=None, description="jobs of these batches")
    error_category: Category | None = Field(
        default=None, description="jobs whose last failure had this category (failed, or pending a retry)"
    )
    limit: int = Field(default=50, ge=1, le=500)
    cursor: JobId | None = Field(default=None, description="next_cursor of the previous page")


class JobPage(BaseModel):
    jobs: list[Job]
    next_cursor: str | None


class Jobs(BaseModel):
    jobs: list[Job]


class DependenciesQuery(Closed):  # from the query string
    limit: int = Field(default=100, ge=1, le=1000, description="dependents per page")
    cursor: JobId | None = Field(default=None, description="next_cursor of the previous page (dependents)")


class DependenciesPage(Dependencies):
    next_cursor: str | None = Field(description="more dependents follow: pass it as cursor")


class BatchQuery(Closed):  # from the query string
    owner_service: Name | None = None
    limit: int = Field(default=50, ge=1, le=500)
    cursor: JobId | None = Field(default=None, description="next_cursor of the previous page")


class BatchPage(BaseModel):
    batches: list[Batch]
    next_cursor: str | None


class ClaimedJobs(BaseModel):
    jobs: list[ClaimedJob]


class BatchCreated(BaseModel):
    batch_id: int | None = Field(description="the batch of the jobs created now; null when every job was a repeat")
    jobs: list[Job]


Seconds = Annotated[float, Field(ge=0, le=60, description="seconds, at most 60")]


class WaitQuery(Closed):  # from the query string
    wait: Seconds = 0


class WaitRequest(Strict):
    ids: list[JobId] = Field(min_length=1, max_length=1000)
    timeout: Seconds = 30
    mode: Literal["any", "all"] = Field(default="all", description="answer when any, or all, of the jobs finished")


class WebhookSet(Strict):
    url: str = Field(
        max_length=rules.WEBHOOK_URL_LENGTH,
        description="http:// or https:// only, with a host and (when given) a port from 1 to 65535",
    )
    events: list[WebhookEvent] | None = Field(
        default=None, min_length=1, description="both when omitted; each at most once"
    )
    rotate_secret: bool = Field(default=False, description="issue a new signing secret (shown once)")

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        problem = rules.webhook_url_problem(url)
        if problem is not None:
            raise ValueError(problem)
        return url

    @field_validator("events")
    @classmethod
    def _events(cls, events: list[WebhookEvent] | None) -> list[WebhookEvent] | None:
        if events is not None and len(set(events)) != len(events):
            raise ValueError("events must not repeat an event")
        return events


class Webhooks(BaseModel):
    webhooks: list[Webhook]


class DeliveryQuery(Closed):  # from the query string
    status: Literal["pending", "retrying", "delivered", "failed"] | None = Field(
        default=None, description="retrying: pending after a failed attempt"
    )
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
    limit: int = Field(default=1, ge=1, le=rules.CLAIM_LIMIT_MAX)
    task_types: list[Name] | None = None
    model_profiles: list[Name] | None = None
    lease_timeout: float | None = Field(
        default=None, gt=0, le=_MAX_LEASE_SECONDS, description="seconds; WORKER_LEASE_TIMEOUT when omitted"
    )


class CompleteRequest(Strict):
    worker_id: Name
    result: Payload
    lease_token: LeaseToken | None = None


class Completion(Strict):
    id: int = Field(ge=1)
    result: Payload
    lease_token: LeaseToken | None = None


class CompleteManyRequest(Strict):
    worker_id: Name
    jobs: list[Completion] = Field(
        min_length=1, max_length=rules.COMPLETE_BATCH_MAX, description="distinct ids; each fenced on its own"
    )

    @field_validator("jobs")
    @classmethod
    def _distinct(cls, jobs: list[Completion]) -> list[Completion]:
        if len({j.id for j in jobs}) != len(jobs):
            raise ValueError("each job id at most once")
        return jobs


class Outcome(BaseModel):
    id: int
    outcome: Literal["completed", "lease_lost", "not_found"]


class Outcomes(BaseModel):
    jobs: list[Outcome] = Field(description="one per job sent, in the order sent")


class FailRequest(Strict):
    worker_id: Name
    error_category: Category
    error_message: str | None = Field(
        default=None,
        description=f"stored as its first {rules.ERROR_MESSAGE_LENGTH} characters when longer (as fail_job does)",
    )
    retryable: bool | None = Field(
        default=None, description="null or left out: aiservice.is_retryable(error_category) decides"
    )
    retry_after: float | None = Field(default=None, ge=0, le=_MAX_RETRY_AFTER_SECONDS, description="seconds")
    lease_token: LeaseToken | None = None

    @field_validator("error_message")
    @classmethod
    def _message_text(cls, value: str | None) -> str | None:
        return None if value is None else text(value)

    def retry_delay(self) -> timedelta | None:
        return None if self.retry_after is None else timedelta(seconds=self.retry_after)


class HeartbeatRequest(Strict):
    worker_id: Name
    lease_timeout: float | None = Field(default=None, gt=0, le=_MAX_LEASE_SECONDS, description="seconds")
    lease_token: LeaseToken | None = None


class Lease(BaseModel):
    id: int
    lease_expires_at: datetime


class StatsQuery(Closed):  # from the query string: values arrive as text
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


class Readiness(Health):
    """/readyz: ``ready``, ``database unavailable``, or the schema's state (``schema_not_migrated``,
    ``schema_too_new``) with the migration this code needs and the one the database is at."""

    message: str | None = None
    expected_migration: int | None = None
    found_migration: int | None = None


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class LimitChange(Strict):
    """The settable fields of a limit: a field not sent keeps its value, one sent as null is cleared.
    weight is for owner_service limits only, cooldown and cooldown_until for model_profile limits
    only: set_limit answers 422 for a field the scope does not use."""

    paused: bool | None = None
    max_running: Annotated[int, Field(ge=0, le=rules.MAX_RUNNING_MAX)] | None = None
    max_per_minute: Annotated[int, Field(ge=0, le=rules.MAX_PER_MINUTE_MAX)] | None = None
    max_tokens_per_minute: Annotated[int, Field(ge=0, le=rules.MAX_TOKENS_PER_MINUTE_MAX)] | None = None
    weight: (
        Annotated[
            int, Field(ge=rules.WEIGHT_MIN, le=rules.WEIGHT_MAX, description="owner_service only: share of claims")
        ]
        | None
    ) = None
    cooldown: bool | None = Field(
        default=None, description="model_profile only; false: rate limits do not pause the whole profile"
    )
    cooldown_until: None = Field(default=None, description="model_profile only, read-only; null ends a cool-down early")


class Limits(BaseModel):
    limits: list[Limit]
