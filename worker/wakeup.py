"""When the claimer looks for work: at once on a notification, at run_at for a job due later,
and otherwise every poll interval."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from aiservice.events import wait_event

# Clock skew between worker and database: a timer fires this much after run_at.
_TIMER_MARGIN = 0.05
# Jobs due later are woken by timers up to this many distinct due times; beyond, polling finds them.
_MAX_TIMERS = 256


class Wakeup:
    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._timers: dict[float, asyncio.TimerHandle] = {}
        self._stopped = False

    def now(self) -> None:
        if not self._stopped:
            self._event.set()

    def at(self, run_at: datetime) -> None:
        delay = (run_at - datetime.now(UTC)).total_seconds() + _TIMER_MARGIN
        if delay <= _TIMER_MARGIN:
            self.now()
            return
        key = round(run_at.timestamp(), 2)
        if self._stopped or key in self._timers or len(self._timers) >= _MAX_TIMERS:
            return
        self._timers[key] = asyncio.get_running_loop().call_later(delay, self._fired, key)

    def _fired(self, key: float) -> None:
        self._timers.pop(key, None)
        self.now()

    def clear(self) -> None:
        """Forget earlier wake-ups: the claim about to start looks for their work."""
        self._event.clear()

    async def wait(self, poll_interval: float) -> None:
        """Until woken, or ``poll_interval`` seconds."""
        await wait_event(self._event, poll_interval)

    def stop(self) -> None:
        """No more wake-ups; a waiting claimer returns at once."""
        self._stopped = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._event.set()
