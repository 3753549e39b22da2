"""A job this worker is running, and the table of them, bounded by the claim limit and by each kind's own limit."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiservice import metrics
from aiservice.jobs import Job
from aiservice.worker.kinds import Kind


@dataclass
class InFlight:
    job: Job
    kind: Kind
    work: asyncio.Task[dict[str, Any]]
    started: float = field(default_factory=time.monotonic)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Why the worker stopped the work: "lease_lost" (cancelled, reset or expired elsewhere) or "shutdown".
    stop_reason: str | None = None

    def stop(self, reason: str) -> None:
        # Finished work keeps its outcome: a shutdown must not turn a result into a release.
        if self.work.done():
            return
        if self.stop_reason is None:
            self.stop_reason = reason
        self.work.cancel()

    def log_context(self, worker_id: str) -> dict[str, Any]:
        """Log fields of the job (never its input or result)."""
        return {
            "job_id": self.job.id,
            "task_type": self.job.task_type,
            "model_profile": self.job.model_profile,
            "worker_id": worker_id,
            "attempt": self.job.attempts,
        }

    def observe(self, status: str, category: str = "") -> float:
        """Count how the attempt ended; returns its run time in ms."""
        job = self.job
        metrics.JOBS_FINISHED.labels(job.task_type, job.model_profile, status, category).inc()
        if category:
            metrics.PROVIDER_ERRORS.labels(self.kind.name, category).inc()
        elapsed = time.monotonic() - self.started
        metrics.RUN_SECONDS.labels(job.task_type, status).observe(elapsed)
        return round(elapsed * 1000, 1)


@dataclass
class Counts:
    """Attempts since the worker started, by how they ended (shown on /worker/status)."""

    claimed: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    aborted: int = 0
    released: int = 0
    discarded: int = 0


class Flights:
    """The jobs in flight: at most ``limit`` of them, and at most ``kind_limits[kind.name]`` of one kind
    (a kind not named there is bounded by ``limit`` alone); the worker_slots gauge follows the table."""

    def __init__(self, limit: int, kind_limits: Mapping[str, int] | None = None) -> None:
        self.limit = limit
        self.kind_limits = dict(kind_limits or {})
        self.counts = Counts()
        self._by_id: dict[int, InFlight] = {}
        self._by_kind: Counter[str] = Counter()
        metrics.WORKER_SLOTS.labels("total").set(limit)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[InFlight]:
        return iter(sorted(self._by_id.values(), key=lambda f: f.job.id))

    def free(self, kind: Kind | None = None) -> int:
        """Free slots in all, or for one more job of ``kind``."""
        free = self.limit - len(self._by_id)
        if kind is not None and kind.name in self.kind_limits:
            free = min(free, self.kind_limits[kind.name] - self._by_kind[kind.name])
        return free

    def get(self, job_id: int) -> InFlight | None:
        return self._by_id.get(job_id)

    def add(self, flight: InFlight) -> None:
        self._by_id[flight.job.id] = flight
        self._by_kind[flight.kind.name] += 1
        metrics.WORKER_SLOTS.labels("busy").set(len(self._by_id))

    def remove(self, flight: InFlight) -> None:
        if self._by_id.pop(flight.job.id, None) is not None:
            self._by_kind[flight.kind.name] -= 1
        metrics.WORKER_SLOTS.labels("busy").set(len(self._by_id))
