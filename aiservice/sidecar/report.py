"""One source's report, and the guard that turns any failure of a source into ``available: false``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

import aiohttp

from aiservice.settings import format_duration, redact

log = logging.getLogger(__name__)

Report = dict[str, object]


def available(**data: object) -> Report:
    return {"available": True, "reason": None, **data}


def unavailable(reason: str, **data: object) -> Report:
    return {"available": False, "reason": reason, **data}


def describe(exc: BaseException, secrets: Sequence[str] = ()) -> str:
    """A short reason for a failure, without URLs or anything in ``secrets``."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ContentTypeError):
        return "the reply is not JSON"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status} {exc.message}".rstrip()
    if isinstance(exc, aiohttp.ClientConnectorError):
        # str(exc) names host and port only, but the OS reason is what an operator needs.
        return f"cannot connect: {exc.os_error.strerror or type(exc.os_error).__name__}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__, secrets)


async def guarded(
    name: str,
    collect: Callable[[], Awaitable[Report]],
    limit: timedelta,
    secrets: Sequence[str],
    **fallback: object,
) -> Report:
    """Run one source within ``limit``; a failure becomes a report, never an exception."""
    try:
        async with asyncio.timeout(limit.total_seconds()):
            return await collect()
    except TimeoutError:
        reason = f"timed out after {format_duration(limit)}"
    except Exception as exc:
        reason = describe(exc, secrets)
    # Debug only: a dashboard polling a host without, say, WhisperX would flood the log; the reason is in the reply.
    log.debug("sidecar source %s unavailable: %s", name, reason)
    return unavailable(reason, **fallback)
