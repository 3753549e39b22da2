"""vLLM: load, KV cache, token throughput and latency from its Prometheus /metrics, plus /health and /v1/models.

Token rates come from counter deltas between this sidecar's own successive scrapes, so the first
scrape reports null. Latency quantiles come from vLLM's cumulative histograms, i.e. they cover
every request since vLLM started.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from aiservice.settings import mask_url
from aiservice.sidecar import urls
from aiservice.sidecar.histogram import quantile
from aiservice.sidecar.report import Report, available, describe, unavailable

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
# vLLM renamed the KV-cache gauge; older servers only expose the second name.
KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
TTFT = "vllm:time_to_first_token_seconds"
E2E = "vllm:e2e_request_latency_seconds"

# Two dashboards polling at once would otherwise compute rates over a few milliseconds.
MIN_RATE_WINDOW_S = 1.0

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse_metrics(text: str) -> Samples:
    """Every sample in a text exposition, by sample name (``…_total``, ``…_bucket``), across all labels."""
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, float(sample.value)))
    return dict(samples)


def total(samples: Samples, name: str) -> float | None:
    """Sum over every series (model, engine) of one metric; None when vLLM does not expose it."""
    values = [value for _, value in samples.get(name, [])]
    return math.fsum(values) if values else None


def mean(samples: Samples, name: str) -> float | None:
    values = [value for _, value in samples.get(name, [])]
    return math.fsum(values) / len(values) if values else None


def latency(samples: Samples, name: str) -> dict[str, float | None] | None:
    """p50/p95 from a histogram, merged across series by bucket bound."""
    buckets: dict[float, float] = defaultdict(float)
    for labels, value in samples.get(f"{name}_bucket", []):
        if "le" in labels:
            buckets[float(labels["le"])] += value
    if not buckets:
        return None
    return {"p50": quantile(0.5, buckets), "p95": quantile(0.95, buckets), "count": total(samples, f"{name}_count")}


def _count(value: float | None) -> int | None:
    return None if value is None else round(value)


@dataclass(frozen=True)
class _Totals:
    at: float
    prompt: float | None
    generation: float | None


def _rate(before: float | None, after: float | None, seconds: float) -> float | None:
    # A counter that went down means vLLM restarted; no rate can be told for that window.
    if before is None or after is None or after < before:
        return None
    return (after - before) / seconds


class VllmSource:
    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        clock: Callable[[], float],
        secrets: Sequence[str] = (),
    ) -> None:
        self._root = urls.server_root(base_url)
        self._session = session
        self._clock = clock
        self._secrets = secrets
        self._baseline: _Totals | None = None
        self._rates: tuple[float | None, float | None] = (None, None)
        self.public_url = mask_url(base_url)

    async def _text(self, path: str) -> str:
        async with self._session.get(urls.join(self._root, path), raise_for_status=True) as response:
            return await response.text()

    async def _models(self) -> list[str]:
        async with self._session.get(urls.join(self._root, "/v1/models"), raise_for_status=True) as response:
            body = await response.json(content_type=None)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise ValueError("/v1/models did not answer an OpenAI model list")
        return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]

    async def collect(self) -> Report:
        metrics, health, models = await asyncio.gather(
            self._text("/metrics"), self._text("/health"), self._models(), return_exceptions=True
        )
        checks: dict[str, object] = {
            "url": self.public_url,
            "health": self._check(health),
            "models": {**self._check(models), "ids": models if isinstance(models, list) else []},
        }
        if isinstance(metrics, BaseException):
            if not isinstance(metrics, Exception):
                raise metrics
            return unavailable(f"/metrics: {describe(metrics, self._secrets)}", **checks)
        try:
            samples = parse_metrics(metrics)
        except ValueError as exc:
            return unavailable(
                f"/metrics is not a Prometheus text exposition: {describe(exc, self._secrets)}", **checks
            )
        return available(**checks, **self._figures(samples))

    def _check(self, outcome: object) -> dict[str, object]:
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, Exception):
                raise outcome
            return {"ok": False, "reason": describe(outcome, self._secrets)}
        return {"ok": True, "reason": None}

    def _figures(self, samples: Samples) -> dict[str, object]:
        kv_metric = next((name for name in KV_CACHE if name in samples), None)
        prompt_rate, generation_rate = self._advance(
            _Totals(self._clock(), total(samples, PROMPT_TOKENS), total(samples, GENERATION_TOKENS))
        )
        return {
            "requests_running": _count(total(samples, RUNNING)),
            "requests_waiting": _count(total(samples, WAITING)),
            "kv_cache_usage": mean(samples, kv_metric) if kv_metric else None,
            "kv_cache_metric": kv_metric,
            "prompt_tokens_per_s": prompt_rate,
            "generation_tokens_per_s": generation_rate,
            "time_to_first_token_seconds": latency(samples, TTFT),
            "e2e_request_latency_seconds": latency(samples, E2E),
        }

    def _advance(self, now: _Totals) -> tuple[float | None, float | None]:
        """Rates since the previous scrape at least MIN_RATE_WINDOW_S ago; the newer scrape becomes the baseline."""
        before = self._baseline
        if before is None:
            self._baseline = now
            return self._rates
        seconds = now.at - before.at
        if seconds < MIN_RATE_WINDOW_S:
            return self._rates
        self._rates = (_rate(before.prompt, now.prompt, seconds), _rate(before.generation, now.generation, seconds))
        self._baseline = now
        return self._rates
