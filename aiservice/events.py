"""Waiting for an asyncio.Event with a time limit, cancellation kept.

On Python 3.11, ``asyncio.wait_for(event.wait(), t)`` returns normally when the task is cancelled
in the same loop iteration as the event is set: the cancellation is lost, and a loop that waits
this way never stops (a shutdown that cancels it then hangs). ``asyncio.timeout`` does not lose it.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Whether ``event`` was set within ``seconds``; a cancellation always propagates."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True
