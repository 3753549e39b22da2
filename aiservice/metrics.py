"""Prometheus metrics of the API and worker processes.

Labels are bounded: task_type, model_profile, status, error_category, route templates, provider
names. Never owner_ref, job ids or raw paths. task_type, model_profile and owner_service are chosen
by callers, so each keeps its known values (the built-in workers' and the configured LLM_MODEL) and
the first LABEL_VALUE_LIMIT others this process sees; any further value is counted as ``other``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Self

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from aiservice.jobs import Stats

# One batch of 5,000 task types must not turn into 5,000 series per metric.
LABEL_VALUE_LIMIT = 50
OTHER = "other"


class LabelBound:
    """The values one caller-chosen label may take: the known ones, then the first ``limit`` others seen."""

    def __init__(self, known: Iterable[str] = (), limit: int = LABEL_VALUE_LIMIT) -> None:
        self.known = set(known)
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()  # the worker observes from threads too

    def __call__(self, value: str) -> str:
        if value in self.known or value in self._seen or value == OTHER:
            return value
        with self._lock:
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return OTHER

    def forget(self) -> None:
        """Forget the values seen so far (the known ones stay)."""
        with self._lock:
            self._seen.clear()


# The built-in workers' task types and profiles (worker/llm.py, worker/whisperx.py); the LLM worker's
# profile is LLM_MODEL, added by expect_labels().
LABEL_BOUNDS = {
    "task_type": LabelBound(["llm_chat", "chat_completion", "call_analysis", "transcribe"]),
    "model_profile": LabelBound(["whisperx"]),
    "owner_service": LabelBound(),
}


def bounded(label: str, value: str) -> str:
    """``value`` if the label may take it, else ``other``; labels without a bound pass unchanged."""
    bound = LABEL_BOUNDS.get(label)
    return value if bound is None else bound(value)


def expect_labels(*, task_types: Iterable[str] = (), model_profiles: Iterable[str] = ()) -> None:
    """Values configured for this deployment keep their own series, however many others came first."""
    LABEL_BOUNDS["task_type"].known.update(task_types)
    LABEL_BOUNDS["model_profile"].known.update(model_profiles)


def forget_label_values() -> None:
    for bound in LABEL_BOUNDS.values():
        bound.forget()


def _bound(
    names: Sequence[str], values: tuple[Any, ...], keywords: dict[str, Any]
) -> tuple[tuple[str, ...], dict[str, str]]:
    # strict: a wrong number of values raises ValueError, as prometheus_client's own check does.
    return (
        tuple(bounded(name, str(value)) for name, value in zip(names, values, strict=True)) if values else (),
        {name: bounded(name, str(value)) for name, value in keywords.items()},
    )


# labels() bounds the caller-chosen values, so the call sites stay as they are.


class BoundedCounter(Counter):
    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Self:
        values, keywords = _bound(self._labelnames, labelvalues, labelkwargs)
        return super().labels(*values, **keywords)


class BoundedGauge(Gauge):
    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Self:
        values, keywords = _bound(self._labelnames, labelvalues, labelkwargs)
        return super().labels(*values, **keywords)


class BoundedHistogram(Histogram):
    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Self:
        values, keywords = _bound(self._labelnames, labelvalues, labelkwargs)
        return super().labels(*values, **keywords)


# Job durations span milliseconds (stubs, cache hits) to an hour (long transcriptions).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class CreatedTotals(Collector):
    """aiservice_jobs_created_total: jobs created through any door (HTTP or the SQL API), as the
    database counts them (stats()["created"]). A Counter counts what its own process sees, which
    missed every job created in SQL; this exposes the database's totals instead, as a counter (they
    only grow: deleting jobs does not lower them). Every API process reports the same totals, set by
    refresh_queue after each maintenance pass: aggregate replicas with max(), not sum()."""

    NAME = "aiservice_jobs_created"
    HELP = "Jobs created through HTTP and the SQL API alike (database counters, refreshed every MAINTENANCE_INTERVAL)"

    def __init__(self) -> None:
        self._totals: dict[tuple[str, str], int] = {}

    def set(self, totals: dict[tuple[str, str], int]) -> None:
        self._totals = dict(totals)

    def value(self, task_type: str, model_profile: str) -> int:
        return self._totals.get((task_type, model_profile), 0)

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.NAME, self.HELP, labels=["task_type", "model_profile"])

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.NAME, self.HELP, labels=["task_type", "model_profile"])
        for (task_type, model_profile), count in sorted(self._totals.items()):
            family.add_metric([task_type, model_profile], count)
        yield family


JOBS_CREATED = CreatedTotals()
REGISTRY.register(JOBS_CREATED)
JOBS_FINISHED = BoundedCounter(
    "aiservice_jobs_finished_total",
    "Job attempts finished by this process",
    ["task_type", "model_profile", "status", "error_category"],
    registry=REGISTRY,
)
QUEUE_JOBS = BoundedGauge(
    "aiservice_queue_jobs",
    "Jobs in the table by status (refreshed from SQL counters)",
    ["task_type", "model_profile", "status"],
    registry=REGISTRY,
)
OLDEST_PENDING = BoundedGauge(
    "aiservice_oldest_pending_age_seconds",
    "Age of the oldest claimable pending job (refreshed from SQL)",
    ["task_type"],
    registry=REGISTRY,
)
WAIT_SECONDS = BoundedHistogram(
    "aiservice_job_wait_seconds",
    "Time from creation to start of the attempt",
    ["task_type"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
RUN_SECONDS = BoundedHistogram(
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
PROVIDER_UP = Gauge(
    "aiservice_provider_up",
    "1 when the provider answered and accepted the credentials at the last status check, else 0",
    ["provider"],
    registry=REGISTRY,
)
PROVIDER_ERRORS = Counter(
    "aiservice_provider_errors_total",
    "Provider requests that failed, by error category",
    ["provider", "error_category"],
    registry=REGISTRY,
)
# Limits are set by operators, so their names are a bounded set of label values.
LIMIT_USAGE = Gauge(
    "aiservice_limit",
    "Capacity limits and their live usage (refreshed from SQL): paused (0/1), max_running, max_per_minute, "
    "max_tokens_per_minute, running, started_last_minute, tokens_last_minute, cooling_down (0/1)",
    ["scope", "name", "field"],
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


_LIMIT_FIELDS = {
    "max_running",
    "max_per_minute",
    "max_tokens_per_minute",
    "running",
    "started_last_minute",
    "tokens_last_minute",
}


def refresh_queue(stats: Stats) -> None:
    """Set the queue gauges and the created totals from one stats() read (series that vanished are
    dropped); the rows that share a series once bounded (``other``) are summed, and their oldest age is kept."""
    depth: dict[tuple[str, str, str], int] = {}
    for row in stats.by_status:
        key = (bounded("task_type", row.task_type), bounded("model_profile", row.model_profile), row.status.value)
        depth[key] = depth.get(key, 0) + row.count
    created: dict[tuple[str, str], int] = {}
    for made in stats.created:
        pair = (bounded("task_type", made.task_type), bounded("model_profile", made.model_profile))
        created[pair] = created.get(pair, 0) + made.count
    JOBS_CREATED.set(created)
    oldest: dict[str, float] = {}
    for pending in stats.oldest_pending:
        task_type = bounded("task_type", pending.task_type)
        oldest[task_type] = max(oldest.get(task_type, 0.0), pending.age_seconds)
    QUEUE_JOBS.clear()
    for labels, count in depth.items():
        QUEUE_JOBS.labels(*labels).set(count)
    OLDEST_PENDING.clear()
    for task_type, age in oldest.items():
        OLDEST_PENDING.labels(task_type).set(age)
    LIMIT_USAGE.clear()
    for limit in stats.limits:
        fields = limit.model_dump(include=_LIMIT_FIELDS) | {
            "paused": int(limit.paused),
            "cooling_down": int(limit.cooldown_until is not None),
        }
        for field, value in fields.items():
            if value is not None:
                LIMIT_USAGE.labels(limit.scope.value, limit.name, field).set(value)
