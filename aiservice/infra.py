"""/api/v1/infra/status: the AI-server sidecar's telemetry, proxied with a timeout and a short cache."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from aiservice.providers import under
from aiservice.settings import Settings, mask_url, redact, url_secrets

CACHE_SECONDS = 5.0
TIMEOUT = 5.0


class InfraStatus:
    def __init__(self, settings: Settings, *, cache_seconds: float = CACHE_SECONDS, timeout: float = TIMEOUT) -> None:
        self.settings = settings
        self.cache_seconds = cache_seconds
        self.timeout = timeout
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()

    async def status(self) -> dict[str, Any]:
        if not self.settings.infra_sidecar_url:
            return {"configured": False}
        async with self._lock:  # concurrent callers share one request to the sidecar
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > self.cache_seconds:
                self._cached = (now, await self._fetch(self.settings.infra_sidecar_url))
            return self._cached[1]

    async def _fetch(self, url: str) -> dict[str, Any]:
        out: dict[str, Any] = {"configured": True, "url": mask_url(url), "reachable": False}
        token = self.settings.infra_sidecar_token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(under(url, "/status"), headers=headers, allow_redirects=False) as response,
            ):
                if response.status != 200:
                    out["error"] = f"sidecar answered HTTP {response.status}"
                    return out
                body = await response.json(content_type=None)
        except TimeoutError:
            out["error"] = f"sidecar did not answer within {self.timeout:g}s"
            return out
        except (aiohttp.ClientError, ValueError) as exc:
            out["error"] = redact(f"{type(exc).__name__}: {exc}", [*url_secrets(url), token])
            return out
        if not isinstance(body, dict):
            out["error"] = "sidecar answered something other than a JSON object"
            return out
        out["reachable"] = True
        out["error"] = None
        return out | body
