"""Graceful shutdown: stop claiming, give the jobs in flight a grace period, then stop the rest;
their supervisors hand them back with release_job (no attempt used). A second signal (hurry)
ends the grace period at once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from aiservice.worker.claimer import Claimer
from aiservice.worker.leases import LeaseKeeper
from aiservice.worker.supervisor import Supervisor

log = logging.getLogger(__name__)


async def shut_down(
    claimer: Claimer, supervisor: Supervisor, leases: LeaseKeeper, *, grace: float, hurry: asyncio.Event
) -> None:
    await claimer.stop(grace)
    if running := len(supervisor.flights):
        log.info("waiting up to %gs for %d jobs in flight", grace, running)
        await _first(supervisor.join(), hurry.wait(), within=grace)
    supervisor.stop_all("shutdown")
    await supervisor.join()
    await leases.close()


async def _first(*waits: Coroutine[Any, Any, Any], within: float) -> None:
    """Until the first of ``waits`` returns, or ``within`` seconds."""
    tasks = {asyncio.ensure_future(wait) for wait in waits}
    try:
        await asyncio.wait(tasks, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
