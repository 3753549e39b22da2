"""What the job channel's notifications mean to a worker: Pending (work to claim) and Abort (stop a
running job). The worker hears them through aiservice.db.listener.Listener.

Notifications are only a hint (see docs/adr/0003-notifications.md): the runner polls anyway, so
while the listener is down jobs are still picked up, one poll interval later."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pending:
    """Jobs of this kind can be claimed now, or at ``run_at``."""

    task_type: str | None  # None: any (a limit on a whole profile or owner changed)
    model_profile: str | None
    run_at: datetime | None


@dataclass(frozen=True)
class Abort:
    """A running job was cancelled or reset by someone else; its worker should stop it."""

    id: int
    worker_id: str | None
    status: str


Event = Pending | Abort


def _optional(value: Any) -> str | None:
    return None if value is None else str(value)


def parse_event(payload: dict[str, Any]) -> Event | None:
    try:
        if payload.get("event") == "pending":
            run_at = payload.get("run_at")
            return Pending(
                task_type=_optional(payload["task_type"]),
                model_profile=_optional(payload["model_profile"]),
                run_at=datetime.fromisoformat(run_at) if run_at else None,
            )
        if payload.get("event") == "abort":
            worker_id = payload.get("worker_id")
            return Abort(
                id=int(payload["id"]),
                worker_id=None if worker_id is None else str(worker_id),
                status=str(payload.get("status")),
            )
    except (KeyError, TypeError, ValueError):
        log.warning("ignoring a malformed notification: %.200s", payload)
    return None


def dispatch_to(on_event: Callable[[Event], None]) -> Callable[[dict[str, Any]], None]:
    """A payload handler for the listener: each well-formed notification goes to ``on_event`` as an Event."""

    def dispatch(payload: dict[str, Any]) -> None:
        event = parse_event(payload)
        if event is not None:
            on_event(event)

    return dispatch
