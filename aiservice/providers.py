"""Provider status: is each configured AI provider reachable, without spending tokens or leaking secrets."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
from yarl import URL

from aiservice import metrics
from aiservice.provider_errors import AUTH_ERROR_CODES
from aiservice.settings import Settings, mask_url, redact, url_secrets

# A dashboard polling every second must not turn into a request per poll per provider.
CACHE_SECONDS = 10.0
CHECK_TIMEOUT = 5.0
# Enough of a provider's error message to tell what is wrong; the rest of the body is not read.
ERROR_MESSAGE_LIMIT = 300
ERROR_BODY_LIMIT = 64 * 1024


def error_details(raw: bytes) -> tuple[str, set[str]]:
    """The message and the type/code of an error body: OpenAI-style ``{"error": {...}}``, FastAPI's
    ``{"detail": ...}``, or plain text."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        return text, set()
    error = body.get("error", body) if isinstance(body, dict) else body
    if not isinstance(error, dict):
        return str(error), set()
    message = next((error[key] for key in ("message", "detail", "msg") if key in error), text)
    kinds = {str(error[key]).lower() for key in ("type", "code") if error.get(key) is not None}
    return message if isinstance(message, str) else json.dumps(message), kinds


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
        providers = {"llm": llm, "whisperx": whisperx}
        for name, found in providers.items():
            if found["configured"]:
                metrics.PROVIDER_UP.labels(name).set(1 if found["reachable"] and found["authorized"] else 0)
        return {"checked_at": datetime.now(UTC).isoformat(), "providers": providers}

    async def _probe(self, session: aiohttp.ClientSession, url: URL, headers: dict[str, str]) -> dict[str, Any]:
        """``reachable``: it answered HTTP at all. ``authorized``: it accepted the request (True), refused
        the credentials (False: 401, 403 or an authentication error type), or cannot tell (None)."""
        started = time.perf_counter()
        out: dict[str, Any] = {"reachable": False, "authorized": None, "latency_ms": None, "error": None}
        try:
            async with session.get(url, headers=headers, allow_redirects=False) as response:
                out["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
                out["http_status"] = response.status
                out["reachable"] = True
                if response.status >= 400:
                    message, kinds = error_details(await response.content.read(ERROR_BODY_LIMIT))
                    if response.status in (401, 403) or kinds & AUTH_ERROR_CODES:
                        out["authorized"] = False
                    message = redact(message, self._secrets())[:ERROR_MESSAGE_LIMIT]
                    out["error"] = f"HTTP {response.status} from provider" + (f": {message}" if message else "")
                    return out
                out["authorized"] = True
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
        # What the LLM worker's openai client sends: it insists on a key, "unused" when none is set.
        headers = {"Authorization": f"Bearer {s.llm_api_key or 'unused'}"}
        probe = await self._probe(session, under(s.llm_base_url, "/models"), headers)
        body = probe.pop("body", None)
        models: list[str] = []
        if isinstance(body, dict) and isinstance(body.get("data"), list):
            models = [str(m.get("id")) for m in body["data"] if isinstance(m, dict)]
        elif probe["authorized"]:
            # A success that is not a model list (a proxy's page) tells nothing about the key.
            probe["authorized"] = None
            probe["error"] = "GET /models did not return an OpenAI-style model list"
        served = s.llm_model in models
        if probe["authorized"] and not served:
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
