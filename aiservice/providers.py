"""Provider status: is each configured AI provider reachable, without spending tokens or leaking secrets."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
from yarl import URL

from aiservice.settings import Settings, mask_url, redact, url_secrets

# A dashboard polling every second must not turn into a request per poll per provider.
CACHE_SECONDS = 10.0
CHECK_TIMEOUT = 5.0


def under(base: str, path: str) -> URL:
    """``path`` below ``base``, keeping the base's query string (some gateways take keys there)."""
    parsed = URL(base)
    return parsed.with_path(parsed.path.rstrip("/") + path).with_query(parsed.query)


class ProviderStatus:
    def __init__(
        self, settings: Settings, *, cache_seconds: float = CACHE_SECONDS, timeout: float = CHECK_TIMEOUT
    ) -> None:
        self.settings = settings
        self.cache_seconds = cache_seconds
        self.timeout = timeout
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()

    def _secrets(self) -> list[str | None]:
        s = self.settings
        # Raw URLs go too: their masked form is what callers may see.
        return [*url_secrets(s.llm_base_url), *url_secrets(s.whisperx_url), s.llm_api_key, s.service_token]

    async def status(self) -> dict[str, Any]:
        async with self._lock:  # concurrent callers share one round of checks
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > self.cache_seconds:
                self._cached = (now, await self._check_all())
            return self._cached[1]

    async def _check_all(self) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            llm, whisperx = await asyncio.gather(self._llm(session), self._whisperx(session))
        return {"checked_at": datetime.now(UTC).isoformat(), "providers": {"llm": llm, "whisperx": whisperx}}

    async def _probe(self, session: aiohttp.ClientSession, url: URL, headers: dict[str, str]) -> dict[str, Any]:
        started = time.perf_counter()
        out: dict[str, Any] = {"reachable": False, "latency_ms": None, "error": None}
        try:
            async with session.get(url, headers=headers, allow_redirects=False) as response:
                out["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
                out["http_status"] = response.status
                if response.status >= 400:
                    out["error"] = f"HTTP {response.status} from provider"
                    return out
                out["reachable"] = True
                out["body"] = await response.json(content_type=None)
        except TimeoutError:
            out["error"] = f"no answer within {self.timeout:g}s"
        except (aiohttp.ClientError, ValueError) as exc:
            out["error"] = redact(f"{type(exc).__name__}: {exc}", self._secrets())
        return out

    async def _llm(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        s = self.settings
        if not s.llm_base_url:
            return {"configured": False}
        headers = {"Authorization": f"Bearer {s.llm_api_key}"} if s.llm_api_key else {}
        probe = await self._probe(session, under(s.llm_base_url, "/models"), headers)
        body = probe.pop("body", None)
        models: list[str] = []
        if isinstance(body, dict) and isinstance(body.get("data"), list):
            models = [str(m.get("id")) for m in body["data"] if isinstance(m, dict)]
        elif probe["reachable"]:
            probe["reachable"] = False
            probe["error"] = "GET /models did not return an OpenAI-style model list"
        served = s.llm_model in models
        if probe["reachable"] and not served:
            probe["error"] = f"model {s.llm_model!r} is not served"
        return {
            "configured": True,
            "url": mask_url(s.llm_base_url),
            "model": s.llm_model,
            "model_served": served,
            "models": models,
            **probe,
        }

    async def _whisperx(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        s = self.settings
        if not s.whisperx_url:
            return {"configured": False}
        # whisper-asr-webservice is a FastAPI app: its OpenAPI route answers without running a model.
        probe = await self._probe(session, under(s.whisperx_url, "/openapi.json"), {})
        probe.pop("body", None)
        return {"configured": True, "url": mask_url(s.whisperx_url), **probe}
