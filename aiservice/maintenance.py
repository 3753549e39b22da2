"""The maintenance loop of every API and worker process: an aiservice.maintain() pass per MAINTENANCE_INTERVAL.

Replicas share the work through SQL: a pass started elsewhere less than an interval ago makes this one a no-op."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiservice import errors
from aiservice.db.store import JobStore
from aiservice.settings import Settings, format_duration

log = logging.getLogger("aiservice.maintenance")


async def run_pass(store: JobStore, settings: Settings) -> dict[str, object]:
    """One pass; each failed step is logged under its own name."""
    # A little under the interval, so that timers drifting apart do not skip a whole interval.
    every = settings.maintenance_interval * 0.9
    done = await store.maintain(settings.job_retention, every)
    for step, message in done.get("errors", {}).items():
        log.error("maintenance step %s failed: %s", step, message)
    if done.get("expire_leases"):
        log.warning("expired %d leases nobody renewed", done["expire_leases"])
    if done.get("purge_jobs") and settings.job_retention is not None:
        log.info(
            "deleted %d jobs finished more than %s ago", done["purge_jobs"], format_duration(settings.job_retention)
        )
    return done


async def maintain_forever(
    store: JobStore, settings: Settings, after: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Run passes until cancelled; ``after`` runs after each pass (the API refreshes its queue gauges)."""
    while True:
        await asyncio.sleep(settings.maintenance_interval.total_seconds())
        await store.schema_ready()  # a database not (or no longer) at this code's schema is waited out
        try:
            await run_pass(store, settings)
            if after is not None:
                await after()
        except errors.SchemaMismatch:
            pass  # logged by the schema gate; the next pass waits in schema_ready()
        except errors.DatabaseUnavailable:
            log.warning("maintenance skipped: PostgreSQL unavailable")
        except Exception:
            log.exception("maintenance pass failed")
