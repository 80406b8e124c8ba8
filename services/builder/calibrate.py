"""Stage 7, calibrate: how much quality each fallback rate buys, and the router's threshold.

For each threshold t, a request falls back (is answered by the teacher) when the local answer
did not parse or its confidence is below t. System quality then mixes the student's and the
teacher's per-example scores. The stored threshold is the one with the lowest fallback rate
whose system quality reaches `router.target_retention` of the teacher's.
"""

from __future__ import annotations

from typing import Any


def fallback_curve(
    student: list[dict[str, Any]], teacher: list[dict[str, Any]]
) -> list[dict[str, float]]:
    if len(student) != len(teacher):
        raise ValueError("student and teacher results must cover the same examples")
    confidences = sorted({float(e["confidence"]) for e in student} | {0.0, 1.0})
    thresholds = [*confidences, 1.000001]  # the last one sends everything to the teacher
    curve = []
    n = len(student)
    for threshold in thresholds:
        fallback = [e["outcome"] != "parsed" or e["confidence"] < threshold for e in student]
        quality = (
            sum(
                t["score"] if fb else s["score"]
                for s, t, fb in zip(student, teacher, fallback, strict=True)
            )
            / n
        )
        curve.append(
            {"threshold": threshold, "fallback_rate": sum(fallback) / n, "system_quality": quality}
        )
    return curve


def choose_threshold(
    curve: list[dict[str, float]], teacher_quality: float, target_retention: float
) -> dict[str, float]:
    goal = target_retention * teacher_quality
    meeting = [p for p in curve if p["system_quality"] >= goal - 1e-12]
    best = min(meeting, key=lambda p: (p["fallback_rate"], p["threshold"]))
    return {**best, "target_quality": goal}


def calibrate(
    student: list[dict[str, Any]],
    teacher: list[dict[str, Any]],
    *,
    target_retention: float,
    variant: str,
) -> dict[str, Any]:
    curve = fallback_curve(student, teacher)
    teacher_quality = sum(t["score"] for t in teacher) / len(teacher)
    student_quality = sum(s["score"] for s in student) / len(student)
    chosen = choose_threshold(curve, teacher_quality, target_retention)
    return {
        "variant": variant,
        "threshold": chosen["threshold"],
        "fallback_rate": chosen["fallback_rate"],
        "system_quality": chosen["system_quality"],
        "target_retention": target_retention,
        "teacher_quality": teacher_quality,
        "student_quality": student_quality,
        "examples": len(student),
        "curve": curve,
    }
