"""Quantiles estimated from cumulative Prometheus histogram buckets, the way histogram_quantile does it."""

from __future__ import annotations

import math
from collections.abc import Mapping


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Estimate the q-quantile from ``{upper bound: cumulative count}``; None when nothing was observed.

    Within the bucket holding the rank the value is interpolated linearly, assuming observations
    spread evenly across it. The lowest bucket starts at 0 (latencies are never negative). A rank
    that falls in the +Inf bucket answers the highest finite bound, since nothing better is known.
    """
    if not 0 <= q <= 1:
        raise ValueError(f"quantile {q} is outside 0..1")
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    # Scrapes are not atomic across series, so a count may lag its lower neighbour; keep them monotonic.
    counts: list[float] = []
    for bound in bounds:
        counts.append(max(buckets[bound], counts[-1] if counts else 0.0))
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    index = next(i for i, count in enumerate(counts) if count >= rank)
    if index == len(bounds) - 1:
        return bounds[-2] if len(bounds) > 1 else None
    upper = bounds[index]
    if index == 0:
        if upper <= 0:
            return upper
        lower, below = 0.0, 0.0
    else:
        lower, below = bounds[index - 1], counts[index - 1]
    inside = counts[index] - below
    if inside <= 0:
        return upper
    return lower + (upper - lower) * (rank - below) / inside
