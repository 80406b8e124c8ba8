"""The retrain loop's decisions, pure: which train rows a round uses, where the next round's
traces come from, and whether a round passed the gate (on the calibration part only)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from services.builder import decision
from services.core.stats import score_interval


def row_order(count: int, seed: int) -> list[int]:
    """The order train rows enter the loop in: seeded, so a subset is a fair sample and a
    rerun takes the same rows."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order


def initial_count(count: int, initial: int | None) -> int:
    """How many rows the first round uses: `traces.initial`, or all."""
    return count if initial is None else min(initial, count)


def next_source(sources: Sequence[str], rows_left: int, api_teacher: bool) -> str | None:
    """The first source in the spec's order that can add traces: unused train rows, or inputs
    written by an API teacher (a gold teacher has no answers for new inputs). None: nothing
    can be added."""
    for source in sources:
        if source == "train" and rows_left > 0:
            return "train"
        if source == "teacher" and api_teacher:
            return "teacher"
    return None


def round_verdict(
    student: Sequence[float], teacher: Sequence[float], min_retention: float
) -> dict[str, Any]:
    """The gate on one part: the student's mean score over the teacher's on the same rows."""
    if not student or len(student) != len(teacher):
        raise ValueError("the gate needs the student's and the teacher's score on the same rows")
    score = sum(student) / len(student)
    teacher_score = sum(teacher) / len(teacher)
    retention = decision.retention(score, teacher_score)
    return {
        "n": len(student),
        "score": score,
        "interval": score_interval(list(student)),
        "teacher_score": teacher_score,
        "retention": retention,
        "min_retention": min_retention,
        "passed": retention >= min_retention,
    }


def stop_reason(
    verdict: dict[str, Any], number: int, max_rounds: int, source: str | None
) -> str | None:
    """Why the loop ends after round `number` (None: it goes on)."""
    if verdict["passed"]:
        return "passed the gate"
    if not verdict["teacher_score"]:
        return "the teacher scores 0 on the calibration part: check the teacher and the metric"
    if number >= max_rounds:
        return f"under the gate after loop.max_rounds={max_rounds}"
    if source is None:
        return "under the gate with no traces left to add"
    return None
