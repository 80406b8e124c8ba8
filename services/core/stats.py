"""The one percentile every latency figure uses (builder evaluation and benches alike)."""

from __future__ import annotations

from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 1]: the value at rank round(q * (n - 1)); 0.0 if empty."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], not {q}")
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[round(q * (len(ordered) - 1))]
