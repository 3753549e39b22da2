"""vLLM: load, KV cache, token throughput, preemptions, prefix-cache hits and latency from its
Prometheus /metrics, plus /health and /v1/models.

vLLM's counters and histograms are cumulative since it started. Rates, the prefix-cache hit rate and
latency quantiles are computed from the deltas between this sidecar's own successive scrapes (counter
deltas, and bucket deltas for the histograms), so they describe the last window, and the first scrape
reports null.
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
PREEMPTIONS = "vllm:num_preemptions_total"
PREFIX_CACHE_HITS = "vllm:prefix_cache_hits_total"
PREFIX_CACHE_QUERIES = "vllm:prefix_cache_queries_total"
# Older servers report the prefix-cache hit rate as a gauge instead of the two counters.
PREFIX_CACHE_HIT_RATE = "vllm:gpu_prefix_cache_hit_rate"
COUNTERS = (PROMPT_TOKENS, GENERATION_TOKENS, PREEMPTIONS, PREFIX_CACHE_HITS, PREFIX_CACHE_QUERIES)
# Report field -> histogram names, newest first (vLLM renamed time per output token).
HISTOGRAMS = {
    "time_to_first_token_seconds": ("vllm:time_to_first_token_seconds",),
    "e2e_request_latency_seconds": ("vllm:e2e_request_latency_seconds",),
    "inter_token_latency_seconds": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    "request_queue_time_seconds": ("vllm:request_queue_time_seconds",),
}

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


def buckets(samples: Samples, names: Sequence[str]) -> dict[float, float] | None:
    """The cumulative buckets of the first of ``names`` exposed, merged across series by bound."""
    for name in names:
        merged: dict[float, float] = defaultdict(float)
        for labels, value in samples.get(f"{name}_bucket", []):
            if "le" in labels:
                merged[float(labels["le"])] += value
        if merged:
            return dict(merged)
    return None


def _count(value: float | None) -> int | None:
    return None if value is None else round(value)


@dataclass(frozen=True)
class _Scrape:
    """What one scrape read of vLLM's cumulative series."""

    at: float
    counters: dict[str, float | None]
    histograms: dict[str, dict[float, float] | None]


def _delta(before: float | None, after: float | None) -> float | None:
    # A counter that went down means vLLM restarted; nothing can be told for that window.
    if before is None or after is None or after < before:
        return None
    return after - before


def _latency(before: dict[float, float] | None, after: dict[float, float] | None) -> dict[str, object] | None:
    """p50/p95 of the requests observed between two scrapes, from the bucket deltas."""
    if before is None or after is None:
        return None
    window: dict[float, float] = {}
    for bound, count in after.items():
        delta = _delta(before.get(bound, 0.0), count)
        if delta is None:
            return None
        window[bound] = delta
    return {
        "p50": quantile(0.5, window),
        "p95": quantile(0.95, window),
        "count": _count(window.get(math.inf)),
    }


# Before a second scrape there is nothing to compare with.
NO_WINDOW: dict[str, object] = dict.fromkeys(
    ("prompt_tokens_per_s", "generation_tokens_per_s", "preemptions_per_s", "prefix_cache_hit_rate", *HISTOGRAMS)
)


def _window(before: _Scrape, now: _Scrape) -> dict[str, object]:
    """The figures that compare two scrapes."""
    seconds = now.at - before.at
    delta = {name: _delta(before.counters[name], now.counters[name]) for name in COUNTERS}

    def rate(name: str) -> float | None:
        value = delta[name]
        return None if value is None else value / seconds

    hits, queries = delta[PREFIX_CACHE_HITS], delta[PREFIX_CACHE_QUERIES]
    return {
        "prompt_tokens_per_s": rate(PROMPT_TOKENS),
        "generation_tokens_per_s": rate(GENERATION_TOKENS),
        "preemptions_per_s": rate(PREEMPTIONS),
        "prefix_cache_hit_rate": hits / queries if hits is not None and queries else None,
        **{field: _latency(before.histograms[field], now.histograms[field]) for field in HISTOGRAMS},
    }


class VllmSource:
    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        clock: Callable[[], float],
        secrets: Sequence[str] = (),
        *,
        api_key: str | None = None,
    ) -> None:
        self._root = urls.server_root(base_url)
        self._session = session
        self._clock = clock
        self._secrets = secrets
        self._api_key = api_key
        self._baseline: _Scrape | None = None
        self._last: dict[str, object] = NO_WINDOW
        self.public_url = mask_url(base_url)

    async def _text(self, path: str) -> str:
        async with self._session.get(urls.join(self._root, path), raise_for_status=True) as response:
            return await response.text()

    async def _models(self) -> list[str]:
        url = urls.join(self._root, "/v1/models")
        headers = {}
        if self._api_key:
            # vLLM's --api-key guards every /v1 path. One Authorization header holds one credential,
            # so the key replaces the URL's basic credentials here (which keep serving /metrics).
            url = urls.without_userinfo(url)
            headers["Authorization"] = f"Bearer {self._api_key}"
        async with self._session.get(url, headers=headers, raise_for_status=True) as response:
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
        window = self._advance(
            _Scrape(
                self._clock(),
                {name: total(samples, name) for name in COUNTERS},
                {field: buckets(samples, names) for field, names in HISTOGRAMS.items()},
            )
        )
        if PREFIX_CACHE_QUERIES not in samples:
            window = {**window, "prefix_cache_hit_rate": mean(samples, PREFIX_CACHE_HIT_RATE)}
        return {
            "requests_running": _count(total(samples, RUNNING)),
            "requests_waiting": _count(total(samples, WAITING)),
            "kv_cache_usage": mean(samples, kv_metric) if kv_metric else None,
            "kv_cache_metric": kv_metric,
            **window,
        }

    def _advance(self, now: _Scrape) -> dict[str, object]:
        """Figures since the previous scrape at least MIN_RATE_WINDOW_S ago; the newer scrape becomes the baseline."""
        before = self._baseline
        if before is None:
            self._baseline = now
            return self._last
        if now.at - before.at < MIN_RATE_WINDOW_S:
            return self._last
        self._last = _window(before, now)
        self._baseline = now
        return self._last
