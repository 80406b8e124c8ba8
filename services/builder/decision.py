"""The decision a build reports: deploy the local model, re-distill, or serve hybrid.

Pure functions of the evaluation (test part), the calibration and the spec's prices. The bands
are the workflow's: retention of the teacher's quality 90–100% deploy, 75–90% good for most
uses, 50–75% add data and re-distill, under 50% a larger student or hybrid serving.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.builder import cost
from services.builder.spec import CostSpec

BANDS = (
    (0.90, "deploy", "deploy the local model"),
    (0.75, "good", "good for most uses: deploy, with the router sending low-confidence calls "
                   "to the API where one is reachable"),
    (0.50, "re-distill", "add traces (more train rows, the cases it gets wrong) and re-distill"),
    (0.0, "larger model or hybrid", "distill into a larger student, or serve hybrid"),
)  # fmt: skip


# A teacher that scores 0 leaves nothing to retain: no band says anything about the student.
NO_TEACHER_QUALITY = {
    "band": "no teacher quality",
    "next_step": "check the teacher and the metric: the teacher scores 0 on the test part "
    "(its answers are in traces/traces.jsonl and the evaluate stage's folder)",
}


def retention_band(retention: float, teacher_score: float = 1.0) -> dict[str, str]:
    if not teacher_score:
        return NO_TEACHER_QUALITY
    for floor, band, next_step in BANDS:
        if retention >= floor:
            return {"band": band, "next_step": next_step}
    return {"band": BANDS[-1][1], "next_step": BANDS[-1][2]}


def bands_spanned(low: float, high: float) -> list[str]:
    """The bands a retention interval reaches, highest first: more than one, and the held-out
    rows are too few to say which band the student is in."""
    return list(dict.fromkeys(retention_band(r)["band"] for r in (high, low)))


def retention(score: float, teacher_score: float) -> float:
    return score / teacher_score if teacher_score else 0.0


def decide(
    evaluation: dict[str, Any],
    calibration: dict[str, Any],
    *,
    prices: CostSpec,
    teacher_model: str,
    price_map: Callable[[str], tuple[float, float] | None] = cost.litellm_token_prices,
) -> dict[str, Any]:
    """The default quantization against the API teacher and the hybrid router, on the test
    part: quality, retention band, latency, cost per 1K calls, privacy, offline."""
    teacher = evaluation["teacher"]
    local = next(s for s in evaluation["students"]
                 if s["label"] == f"distilled {calibration['variant']}")  # fmt: skip
    kept = retention(local["score"], teacher["score"])
    interval = local["interval"]
    api = api_figures(teacher, local, prices, prices.api_model or teacher_model, price_map)
    local_cost = cost.local_cost_per_1k(
        mean_latency_s=local["latency_mean_ms"] / 1000, local_per_hour=prices.local_per_hour
    )
    hybrid = calibration["test"]
    api_cost = api["cost"]["per_1k_calls"] if api["cost"] else None
    return {
        "variant": calibration["variant"],
        "n": local["n"],
        "retention": kept,
        "retention_range": [
            retention(interval["low"], teacher["score"]),
            retention(interval["high"], teacher["score"]),
        ],
        **retention_band(kept, teacher["score"]),
        "api": api,
        "local": {
            "quality": local["score"],
            "interval": interval,
            "latency_p50_ms": local["latency_p50_ms"],
            "latency_p95_ms": local["latency_p95_ms"],
            "cost_per_1k_calls": local_cost,
        },
        "hybrid": {
            "threshold": calibration["threshold"],
            "quality": hybrid["system_quality"],
            "interval": hybrid["system_interval"],
            "latency_p50_ms": hybrid["latency_p50_ms"],
            "latency_p95_ms": hybrid["latency_p95_ms"],
            "api_share": hybrid["fallback_rate"],
            "api_share_interval": hybrid["fallback_interval"],
            "cost_per_1k_calls": cost.hybrid_cost_per_1k(
                api_share=hybrid["fallback_rate"], api=api_cost, local=local_cost
            ),
        },
        "currency": prices.currency,
    }


def api_figures(
    teacher: dict[str, Any],
    local: dict[str, Any],
    prices: CostSpec,
    model: str,
    price_map: Callable[[str], tuple[float, float] | None],
) -> dict[str, Any]:
    """The teacher as the API: measured latency and tokens; with gold labels nothing was
    called, so the tokens are estimated from the local model's prompts and answers (the same
    prompt, another tokenizer) and latency is not shown."""
    measured = not teacher.get("gold", False)
    source = teacher if measured else local
    tokens_in = source.get("prompt_tokens_per_call", 0.0)
    tokens_out = source.get("completion_tokens_per_call", 0.0)
    priced = None
    if model != "gold" or prices.api_per_1k_calls is not None:
        priced = cost.api_cost_per_1k(
            prompt_tokens_per_call=tokens_in, completion_tokens_per_call=tokens_out,
            cost=prices, model=model, price_map=price_map,
        )  # fmt: skip
    return {
        "model": model,
        "quality": teacher["score"],
        "interval": teacher["interval"],
        "measured": measured,
        "latency_p50_ms": teacher.get("latency_p50_ms"),
        "latency_p95_ms": teacher.get("latency_p95_ms"),
        "prompt_tokens_per_call": tokens_in,
        "completion_tokens_per_call": tokens_out,
        "cost": priced,
    }
