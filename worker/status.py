"""What /worker/status shows about the work: what the worker serves, the jobs in flight with their
age, counts since start and the last claim."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from aiservice.worker.claimer import Claimer
from aiservice.worker.flight import Flights
from aiservice.worker.kinds import Kind


def serves(kinds: Sequence[Kind]) -> list[dict[str, Any]]:
    return [
        {"worker": k.name, "task_types": list(k.task_types), "model_profiles": list(k.model_profiles)} for k in kinds
    ]


def work(flights: Flights, claimer: Claimer) -> dict[str, Any]:
    now = time.monotonic()
    return {
        "in_flight": [
            {
                "id": f.job.id,
                "task_type": f.job.task_type,
                "model_profile": f.job.model_profile,
                "attempt": f.job.attempts,
                "started_at": f.started_at,
                "age_seconds": round(now - f.started, 3),
            }
            for f in flights
        ],
        "counts": asdict(flights.counts),
        "last_claim_at": claimer.last_claim_at,
        "last_poll_at": claimer.last_poll_at,
        "stopping": claimer.stopping,
    }
