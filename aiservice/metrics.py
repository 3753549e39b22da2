"""Prometheus metrics of the API and worker processes.

Labels are bounded: task_type, model_profile, status, error_category, route templates, provider
names. Never owner_ref, job ids or raw paths.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from aiservice.jobs import Job, Stats

# The process-wide default registry: prometheus_async's aiohttp handler serves it (with the
# process and platform collectors), on the API's and on the worker's /metrics.

# Job durations span milliseconds (stubs, cache hits) to an hour (long transcriptions).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

JOBS_CREATED = Counter(
    "aiservice_jobs_created_total",
    "Jobs created through this process",
    ["task_type", "model_profile"],
    registry=REGISTRY,
)
JOBS_FINISHED = Counter(
    "aiservice_jobs_finished_total",
    "Job attempts finished by this process",
    ["task_type", "model_profile", "status", "error_category"],
    registry=REGISTRY,
)
QUEUE_JOBS = Gauge(
    "aiservice_queue_jobs",
    "Jobs in the table by status (refreshed from SQL counters)",
    ["task_type", "model_profile", "status"],
    registry=REGISTRY,
)
OLDEST_PENDING = Gauge(
    "aiservice_oldest_pending_age_seconds",
    "Age of the oldest claimable pending job (refreshed from SQL)",
    ["task_type"],
    registry=REGISTRY,
)
WAIT_SECONDS = Histogram(
    "aiservice_job_wait_seconds",
    "Time from creation to start of the attempt",
    ["task_type"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
RUN_SECONDS = Histogram(
    "aiservice_job_run_seconds",
    "Time from start to end of an attempt",
    ["task_type", "status"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
LLM_TOKENS = Counter(
    "aiservice_llm_tokens_total",
    "LLM tokens used, by model and kind (prompt or completion)",
    ["model", "kind"],
    registry=REGISTRY,
)
PROVIDER_SECONDS = Histogram(
    "aiservice_provider_request_seconds",
    "Provider request latency",
    ["provider", "outcome"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
PROVIDER_ERRORS = Counter(
    "aiservice_provider_errors_total",
    "Provider requests that failed, by error category",
    ["provider", "error_category"],
    registry=REGISTRY,
)
WORKER_SLOTS = Gauge(
    "aiservice_worker_slots",
    "Worker job slots, by state (busy or total)",
    ["state"],
    registry=REGISTRY,
)
HTTP_REQUESTS = Counter(
    "aiservice_http_requests_total",
    "HTTP requests by route template, method and status",
    ["route", "method", "status"],
    registry=REGISTRY,
)
HTTP_SECONDS = Histogram(
    "aiservice_http_request_seconds",
    "HTTP request latency by route template",
    ["route", "method"],
    registry=REGISTRY,
)


def count_created(jobs: Iterable[Job]) -> None:
    counts: dict[tuple[str, str], int] = {}
    for job in jobs:
        key = (job.task_type, job.model_profile)
        counts[key] = counts.get(key, 0) + 1
    for (task_type, model_profile), n in counts.items():
        JOBS_CREATED.labels(task_type, model_profile).inc(n)


def refresh_queue(stats: Stats) -> None:
    """Set the queue gauges from one stats() read (series that vanished are dropped)."""
    QUEUE_JOBS.clear()
    for row in stats.by_status:
        QUEUE_JOBS.labels(row.task_type, row.model_profile, row.status.value).set(row.count)
    OLDEST_PENDING.clear()
    for pending in stats.oldest_pending:
        OLDEST_PENDING.labels(pending.task_type).set(pending.age_seconds)
