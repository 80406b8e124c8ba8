"""Stage 7, calibrate: the router's threshold, chosen on the calibration part and measured on
the test part.

For a threshold t, a request falls back (is answered by the teacher) when the local answer did
not parse or its confidence is below t; system quality mixes the student's and the teacher's
per-example scores. The stored threshold is the one with the lowest fallback rate whose system
quality on the calibration part reaches `router.target_retention` of the teacher's there. Its
fallback rate and system quality are then measured on the test part, which did not choose it.
"""

from __future__ import annotations

from typing import Any

from services.core.stats import percentile, score_interval, wilson_interval


def falls_back(answer: dict[str, Any], threshold: float) -> bool:
    return bool(answer["outcome"] != "parsed" or answer["confidence"] < threshold)


def measure(
    student: list[dict[str, Any]], teacher: list[dict[str, Any]], threshold: float
) -> dict[str, Any]:
    """Fallback rate and system quality at one threshold, with their per-example values."""
    if len(student) != len(teacher):
        raise ValueError("student and teacher results must cover the same examples")
    fallback = [falls_back(s, threshold) for s in student]
    mixed = [
        t["score"] if fb else s["score"]
        for s, t, fb in zip(student, teacher, fallback, strict=True)
    ]
    n = len(student)
    return {
        "threshold": threshold,
        "fallback_rate": sum(fallback) / n,
        "system_quality": sum(mixed) / n,
        "fallbacks": sum(fallback),
        "mixed_scores": mixed,
        "latencies_ms": hybrid_latencies(student, teacher, fallback),
    }


def hybrid_latencies(
    student: list[dict[str, Any]], teacher: list[dict[str, Any]], fallback: list[bool]
) -> list[float] | None:
    """Each call's latency through the router: the local answer, plus the API's when it falls
    back. None when the teacher was not timed (gold labels)."""
    if not teacher or "latency_ms" not in teacher[0]:
        return None
    return [
        s["latency_ms"] + (t["latency_ms"] if fb else 0.0)
        for s, t, fb in zip(student, teacher, fallback, strict=True)
    ]


def fallback_curve(
    student: list[dict[str, Any]], teacher: list[dict[str, Any]]
) -> list[dict[str, float]]:
    """One point per distinct confidence (plus 0, 1 and one above all: everything falls back)."""
    confidences = sorted({float(e["confidence"]) for e in student} | {0.0, 1.0})
    curve = []
    for threshold in [*confidences, 1.000001]:
        point = measure(student, teacher, threshold)
        curve.append({k: point[k] for k in ("threshold", "fallback_rate", "system_quality")})
    return curve


def choose_threshold(
    curve: list[dict[str, float]], teacher_quality: float, target_retention: float
) -> dict[str, float]:
    goal = target_retention * teacher_quality
    meeting = [p for p in curve if p["system_quality"] >= goal - 1e-12]
    best = min(meeting, key=lambda p: (p["fallback_rate"], p["threshold"]))
    return {**best, "target_quality": goal}


def latency(values: list[float] | None, q: float) -> float | None:
    return None if values is None else percentile(values, q)


def part(examples: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    return [e for e in examples if e.get("split", "test") == split]


def mean_score(examples: list[dict[str, Any]]) -> float:
    return sum(e["score"] for e in examples) / len(examples)


def calibrate(
    student: list[dict[str, Any]],
    teacher: list[dict[str, Any]],
    *,
    target_retention: float,
    variant: str,
) -> dict[str, Any]:
    calib_student, calib_teacher = part(student, "calibration"), part(teacher, "calibration")
    curve = fallback_curve(calib_student, calib_teacher)
    chosen = choose_threshold(curve, mean_score(calib_teacher), target_retention)
    test_student, test_teacher = part(student, "test"), part(teacher, "test")
    on_test = measure(test_student, test_teacher, chosen["threshold"])
    return {
        "variant": variant,
        "threshold": chosen["threshold"],
        "target_retention": target_retention,
        "calibration": {
            "n": len(calib_student),
            "fallback_rate": chosen["fallback_rate"],
            "system_quality": chosen["system_quality"],
            "teacher_quality": mean_score(calib_teacher),
            "student_quality": mean_score(calib_student),
        },
        "test": {
            "n": len(test_student),
            "fallback_rate": on_test["fallback_rate"],
            "fallback_interval": wilson_interval(on_test["fallbacks"], len(test_student)),
            "system_quality": on_test["system_quality"],
            "system_interval": score_interval(on_test["mixed_scores"]),
            "latency_p50_ms": latency(on_test["latencies_ms"], 0.5),
            "latency_p95_ms": latency(on_test["latencies_ms"], 0.95),
            "teacher_quality": mean_score(test_teacher),
            "student_quality": mean_score(test_student),
        },
        "curve": curve,
    }
