"""Statistics every reported figure uses: one percentile (builder evaluation and benches
alike), and the intervals scores are reported with."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 1]: the value at rank round(q * (n - 1)); 0.0 if empty."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], not {q}")
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[round(q * (len(ordered) - 1))]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% with z=1.96); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(
    values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (seeded: the same data gives the same interval)."""
    if not values:
        return 0.0, 1.0
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    return percentile(means, tail), percentile(means, 1 - tail)


def score_interval(scores: Sequence[float]) -> dict[str, Any]:
    """A score's mean, n and 95% interval: Wilson when every score is 0 or 1 (an accuracy),
    a bootstrap of the mean otherwise (F1 and other graded metrics)."""
    n = len(scores)
    mean = sum(scores) / n if n else 0.0
    if all(s in (0.0, 1.0) for s in scores):
        low, high = wilson_interval(round(sum(scores)), n)
        method = "wilson"
    else:
        low, high = bootstrap_interval(scores)
        method = "bootstrap"
    return {"mean": mean, "n": n, "low": low, "high": high, "method": method}


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """'gain' or 'loss' only when the two 95% intervals do not overlap; else 'within noise'."""
    if a["low"] > b["high"]:
        return "gain"
    if a["high"] < b["low"]:
        return "loss"
    return "within noise"
