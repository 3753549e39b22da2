"""wait_event: a cancellation that arrives as the event is set stops the waiting loop."""

from __future__ import annotations

import asyncio

import pytest

from aiservice.events import wait_event


async def test_a_cancel_as_the_event_is_set_stops_the_loop() -> None:
    """The shutdown of every background loop (webhook sender, waiters, listener, wake-ups) cancels
    it; with asyncio.wait_for on Python 3.11 a cancel in the same iteration as a wake-up was lost
    and the loop ran on, so the shutdown hung."""
    event = asyncio.Event()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            await wait_event(event, 30)
            rounds += 1
            event.clear()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)  # parked in wait_event
    event.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert rounds == 0


async def test_it_says_whether_the_event_came() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    event.set()
    assert await wait_event(event, 0.01) is True
