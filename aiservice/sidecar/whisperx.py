"""WhisperX: is the server answering, and how fast."""

from __future__ import annotations

import time

import aiohttp

from aiservice.settings import mask_url
from aiservice.sidecar import urls
from aiservice.sidecar.report import Report, available, unavailable

# WhisperX servers differ in what they serve at the root; FastAPI-based ones always have /docs.
PATHS = ("", "/docs", "/openapi.json")


class WhisperxSource:
    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self._base = base_url
        self._session = session
        self.public_url = mask_url(base_url)

    async def collect(self) -> Report:
        answers: list[str] = []
        for path in PATHS:
            started = time.perf_counter()
            # A connection error propagates: no other path will answer either.
            async with self._session.get(urls.join(self._base, path), allow_redirects=False) as response:
                latency_ms = round((time.perf_counter() - started) * 1000, 1)
                status = response.status
            if status < 400:
                return available(url=self.public_url, reachable=True, latency_ms=latency_ms, path=path or "/")
            answers.append(f"{path or '/'} {status}")
        return unavailable(
            f"answered with errors only: {', '.join(answers)}", url=self.public_url, reachable=True, latency_ms=None
        )
