"""The numbers the report and the router rest on, checked against values computed by hand:
score intervals, the Predict confidence, the fallback curve and the chosen threshold."""

from __future__ import annotations

import math
from typing import Any

import pytest

from services.builder.calibrate import choose_threshold, fallback_curve
from services.builder.report import rows
from services.core.stats import bootstrap_interval, compare, score_interval, wilson_interval
from services.runtime.backends import TokenPiece
from services.runtime.predict import confidence


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        (9, 10, 0.5958, 0.9821),  # textbook values for the Wilson 95% interval
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (111, 120, 0.8636, 0.9600),
    ],
)
def test_wilson_interval(successes: int, n: int, low: float, high: float) -> None:
    got = wilson_interval(successes, n)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_bootstrap_interval_brackets_the_mean_and_is_repeatable() -> None:
    values = [0.1, 0.5, 0.7, 0.9] * 10  # mean 0.55
    low, high = bootstrap_interval(values)
    assert low < 0.55 < high and high - low < 0.3
    assert bootstrap_interval(values) == (low, high)
    assert bootstrap_interval([0.4] * 20) == pytest.approx((0.4, 0.4))  # no spread, no width


def test_score_interval_picks_wilson_for_accuracies_and_bootstrap_for_graded_scores() -> None:
    accuracy = score_interval([1.0] * 9 + [0.0])
    assert accuracy["method"] == "wilson" and accuracy["n"] == 10 and accuracy["mean"] == 0.9
    assert (accuracy["low"], accuracy["high"]) == pytest.approx((0.5958, 0.9821), abs=1e-4)
    graded = score_interval([0.2, 0.4, 0.6, 0.8])
    assert graded["method"] == "bootstrap" and graded["mean"] == pytest.approx(0.5)


def test_a_difference_is_a_gain_only_when_the_intervals_say_so() -> None:
    nine, one, six, five = (score_interval([1.0] * k + [0.0] * (10 - k)) for k in (9, 1, 6, 5))
    assert compare(nine, one) == "gain" and compare(one, nine) == "loss"
    assert compare(six, five) == "within noise"


def evaluation(untuned: list[float], distilled: list[float]) -> dict[str, Any]:
    def result(label: str, scores: list[float]) -> dict[str, Any]:
        return {
            "label": label, "score": sum(scores) / len(scores),
            "examples": [{"score": s} for s in scores], "latency_p50_ms": 1.0,
            "latency_p95_ms": 2.0, "generation_tokens_per_s": 3.0, "size_bytes": 1e6,
            "peak_rss_mb": 4.0,
        }  # fmt: skip

    return {
        "name": "t", "dev_examples": len(untuned),
        "teacher": {"label": "teacher (gold)", "score": 1.0,
                    "examples": [{"score": 1.0}] * len(untuned)},
        "students": [result("untuned student (Q4_1)", untuned),
                     result("distilled Q8_0", distilled)],
    }  # fmt: skip


def test_the_report_shows_intervals_and_calls_a_gain_only_when_they_separate() -> None:
    table = rows(evaluation([0.0] * 9 + [1.0], [1.0] * 9 + [0.0]))
    teacher, untuned, distilled = table
    assert distilled[:4] == ["distilled Q8_0", "90.0% [59.6–98.2]", "gain", "90%"]
    assert untuned[1] == "10.0% [1.8–40.4]" and untuned[2] == ""
    assert teacher[1] == "100.0% [72.2–100.0]"
    close = rows(evaluation([0.0] * 5 + [1.0] * 5, [0.0] * 4 + [1.0] * 6))
    assert close[2][2] == "within noise"


def piece(text: str, start: int, logprob: float | None) -> TokenPiece:
    return TokenPiece(text=text, start=start, end=start + len(text), logprob=logprob)


def test_confidence_is_the_lowest_fields_geometric_mean_probability() -> None:
    # "Paris" from two tokens (p = 0.9, 0.4), "yes" from one (p = 0.8); a scaffold token between.
    pieces = [
        piece("Par", 0, math.log(0.9)), piece("is", 3, math.log(0.4)),
        piece("\n##\n", 5, math.log(0.01)), piece("yes", 9, math.log(0.8)),
    ]  # fmt: skip
    spans = {"capital": (0, 5), "sure": (9, 12)}
    assert confidence(spans, pieces) == pytest.approx(0.6)  # sqrt(0.9 * 0.4) < 0.8
    assert confidence({"sure": (9, 12)}, pieces) == pytest.approx(0.8)
    assert confidence({"empty": (5, 5)}, pieces) == 1.0  # an empty value claims nothing wrong
    unknown = [piece("Paris", 0, None)]
    assert confidence({"capital": (0, 5)}, unknown) == 0.0  # no probabilities: claim nothing


STUDENT = [  # score, outcome, confidence
    {"score": 1.0, "outcome": "parsed", "confidence": 0.9},
    {"score": 0.0, "outcome": "parsed", "confidence": 0.3},
    {"score": 1.0, "outcome": "parsed", "confidence": 0.6},
    {"score": 0.0, "outcome": "unparsed", "confidence": 0.0},
]
TEACHER = [{"score": 1.0}, {"score": 1.0}, {"score": 0.0}, {"score": 1.0}]


def test_fallback_curve_by_hand() -> None:
    curve = {round(p["threshold"], 6): (p["fallback_rate"], p["system_quality"])
             for p in fallback_curve(STUDENT, TEACHER)}  # fmt: skip
    # t=0: only the unparsed one falls back: student 1,0,1 + teacher 1 -> 3/4
    assert curve[0.0] == (0.25, 0.75)
    # t=0.6: the 0.3 one falls back too (teacher right): 1,1,1,1 -> 4/4
    assert curve[0.6] == (0.5, 1.0)
    # t=0.9: the 0.6 one as well (teacher wrong there): 1,1,0,1 -> 3/4
    assert curve[0.9] == (0.75, 0.75)
    # past 1.0 everything falls back: the teacher's 3/4
    assert curve[1.000001] == (1.0, 0.75)


def test_choose_threshold_takes_the_fewest_fallbacks_that_reach_the_target() -> None:
    curve = fallback_curve(STUDENT, TEACHER)
    chosen = choose_threshold(curve, teacher_quality=0.75, target_retention=1.0)
    assert (chosen["threshold"], chosen["fallback_rate"]) == (0.0, 0.25)  # 0.75 already reaches
    strict = choose_threshold(curve, teacher_quality=1.0, target_retention=0.95)
    assert (strict["threshold"], strict["fallback_rate"], strict["system_quality"]) == (
        0.6,
        0.5,
        1.0,
    )
    assert strict["target_quality"] == pytest.approx(0.95)
