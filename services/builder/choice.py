"""Choosing the student to ship among several candidates: a pure function of their measured
figures and the spec's budgets (spec.choice), tested without a build."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.builder.spec import StudentChoice


class NoStudentFits(RuntimeError):
    """No candidate meets the spec's budgets (or every one failed its quality gate)."""


@dataclass(frozen=True)
class Candidate:
    source: str
    description: str
    quantization: str
    n: int
    score: float
    interval: tuple[float, float]
    latency_p50_ms: float
    tokens_per_s: float | None
    size_mb: float
    peak_rss_mb: float | None
    training_s: float | None
    passed_gate: bool
    build_dir: str


def candidate(source: str, description: str, build_dir: Path, passed_gate: bool) -> Candidate:
    """A finished candidate build's figures: its default quantization on the test part."""
    evaluation = json.loads((build_dir / "evaluate" / "eval.json").read_text())
    quant = json.loads((build_dir / "calibrate" / "calibration.json").read_text())["variant"]
    result = next(s for s in evaluation["students"] if s["label"] == f"distilled {quant}")
    loss_path = build_dir / "finetune" / "loss.json"
    training = json.loads(loss_path.read_text()) if loss_path.is_file() else {}
    return Candidate(
        source=source, description=description, quantization=quant, n=result["n"],
        score=result["score"], interval=(result["interval"]["low"], result["interval"]["high"]),
        latency_p50_ms=result["latency_p50_ms"],
        tokens_per_s=result.get("generation_tokens_per_s"),
        size_mb=round(result["size_bytes"] / 1e6, 1), peak_rss_mb=result.get("peak_rss_mb"),
        training_s=training.get("seconds"), passed_gate=passed_gate, build_dir=str(build_dir),
    )  # fmt: skip


def over_budget(candidate: Candidate, rule: StudentChoice) -> list[str]:
    """Why a candidate cannot ship under the rule (empty: it can)."""
    reasons = []
    if not candidate.passed_gate:
        reasons.append("failed its quality gate")
    if rule.max_latency_ms is not None and candidate.latency_p50_ms > rule.max_latency_ms:
        reasons.append(f"p50 {candidate.latency_p50_ms:.0f} ms > {rule.max_latency_ms:g} ms")
    if rule.max_size_mb is not None and candidate.size_mb > rule.max_size_mb:
        reasons.append(f"{candidate.size_mb:.0f} MB > {rule.max_size_mb:g} MB")
    return reasons


def choose(candidates: list[Candidate], rule: StudentChoice) -> Candidate:
    """The best test-part score among those within budget; equal scores go to the smaller."""
    eligible = [c for c in candidates if not over_budget(c, rule)]
    if not eligible:
        why = "; ".join(f"{c.source}: {', '.join(over_budget(c, rule))}" for c in candidates)
        raise NoStudentFits(
            f"no student can ship ({why}); raise choice.max_latency_ms / choice.max_size_mb, "
            "or add a smaller student to students"
        )
    return max(eligible, key=lambda c: (c.score, -c.size_mb))


def comparison(
    candidates: list[Candidate], chosen: Candidate, rule: StudentChoice
) -> dict[str, Any]:
    return {
        "rule": {"best": "test-part score", "ties": "smaller file", **rule.model_dump()},
        "chosen": chosen.source,
        "candidates": [{**asdict(c), "excluded": over_budget(c, rule)} for c in candidates],
    }
