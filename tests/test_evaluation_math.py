"""The numbers the report and the router rest on, checked against values computed by hand:
score intervals, the Predict confidence, the fallback curve and the chosen threshold, the
calibration/test split, the retention bands, and cost per 1K calls."""

from __future__ import annotations

import enum
import json
import math
import re
from typing import Any, Optional

import pytest
from pydantic import BaseModel

from services.builder.calibrate import calibrate, choose_threshold, fallback_curve
from services.builder.cost import (
    api_cost_per_1k,
    hybrid_cost_per_1k,
    litellm_token_prices,
    local_cost_per_1k,
)
from services.builder.data import split_by_group
from services.builder.decision import decide, retention_band
from services.builder.report import decision_rows, rows
from services.builder.spec import CostSpec
from services.core.stats import bootstrap_interval, compare, score_interval, wilson_interval
from services.runtime.backends import TokenPiece
from services.runtime.predict import confidence
from testkit.structured import Line


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


def test_calibration_chooses_on_its_part_and_reports_the_test_part() -> None:
    # Calibration part = STUDENT/TEACHER above: target 0.95 of 0.75 -> threshold 0.0 (the
    # unparsed one falls back, 3/4). On the test part at t=0.0: the unparsed one falls back to
    # a right teacher, the low-confidence wrong one stays local: quality (1 + 0 + 1) / 3.
    test_student = [
        {"score": 1.0, "outcome": "parsed", "confidence": 0.95, "latency_ms": 100.0},
        {"score": 0.0, "outcome": "parsed", "confidence": 0.2, "latency_ms": 120.0},
        {"score": 0.0, "outcome": "unparsed", "confidence": 0.0, "latency_ms": 300.0},
    ]
    test_teacher = [{"score": 1.0, "latency_ms": 900.0}] * 3
    calibration_part = [{**e, "split": "calibration", "latency_ms": 1.0} for e in STUDENT]
    teacher_part = [{**e, "split": "calibration", "latency_ms": 1.0} for e in TEACHER]
    result = calibrate(
        calibration_part + [{**e, "split": "test"} for e in test_student],
        teacher_part + [{**e, "split": "test"} for e in test_teacher],
        target_retention=0.95,
        variant="Q8_0",
    )
    assert result["threshold"] == 0.0 and result["calibration"]["n"] == 4
    assert result["calibration"]["fallback_rate"] == 0.25
    test = result["test"]
    assert test["n"] == 3 and test["fallback_rate"] == pytest.approx(1 / 3)
    assert test["system_quality"] == pytest.approx(2 / 3)
    assert test["fallback_interval"] == pytest.approx(wilson_interval(1, 3))
    # Router latency: local, plus the API's for the call that fell back (300 + 900).
    assert (test["latency_p50_ms"], test["latency_p95_ms"]) == (120.0, 1200.0)


def test_split_by_group_keeps_groups_whole_and_is_seeded() -> None:
    groups = ["a", "a", "b", "c", "c", "d", "e", "f"]
    calibration, test = split_by_group(groups, 0.5, seed=0)
    assert sorted(calibration + test) == list(range(8))
    for group in set(groups):
        rows_of_group = {i for i, g in enumerate(groups) if g == group}
        assert rows_of_group <= set(calibration) or rows_of_group <= set(test)
    assert 4 <= len(calibration) <= 5  # whole groups until half is reached
    assert split_by_group(groups, 0.5, seed=0) == (calibration, test)
    assert split_by_group(groups, 0.5, seed=1) != (calibration, test)


@pytest.mark.parametrize(
    ("retention", "band"),
    [(1.02, "deploy"), (0.90, "deploy"), (0.8999, "good"), (0.75, "good"),
     (0.74, "re-distill"), (0.50, "re-distill"), (0.49, "larger model or hybrid"),
     (0.0, "larger model or hybrid")],
)  # fmt: skip
def test_retention_bands_are_the_workflows(retention: float, band: str) -> None:
    assert retention_band(retention)["band"] == band


def test_cost_per_1k_calls_by_hand() -> None:
    prices = CostSpec(api_input_per_1m_tokens=0.15, api_output_per_1m_tokens=0.60)
    # 1000 x (400 x 0.15e-6 + 20 x 0.60e-6) = 1000 x (6e-5 + 1.2e-5) = 0.072
    got = api_cost_per_1k(prompt_tokens_per_call=400, completion_tokens_per_call=20,
                          cost=prices, model="any")  # fmt: skip
    assert got == {"per_1k_calls": pytest.approx(0.072), "source": "spec cost.api_*_per_1m_tokens"}
    flat = CostSpec(api_per_1k_calls=2.5)
    assert api_cost_per_1k(prompt_tokens_per_call=1, completion_tokens_per_call=1, cost=flat,
                           model="any")["per_1k_calls"] == 2.5  # type: ignore[index]  # fmt: skip
    mapped = api_cost_per_1k(prompt_tokens_per_call=100, completion_tokens_per_call=10,
                             cost=CostSpec(), model="openai/some-model",
                             price_map=lambda model: (1e-6, 2e-6))  # fmt: skip
    assert mapped == {"per_1k_calls": pytest.approx(0.12), "source": "LiteLLM price map "
                      "(openai/some-model)"}  # fmt: skip
    unpriced = api_cost_per_1k(prompt_tokens_per_call=1, completion_tokens_per_call=1,
                               cost=CostSpec(), model="x", price_map=lambda m: None)  # fmt: skip
    assert unpriced is None
    # An hour at 0.36 buys 3600 / 0.5 s = 7200 calls: 1000 calls cost 0.05.
    assert local_cost_per_1k(mean_latency_s=0.5, local_per_hour=0.36) == pytest.approx(0.05)
    assert hybrid_cost_per_1k(api_share=0.2, api=0.072, local=0.05) == pytest.approx(0.0644)


def test_litellm_price_map_knows_a_public_model_offline() -> None:
    prices = litellm_token_prices("openai/gpt-4o-mini")
    assert prices is not None and 0 < prices[0] < prices[1] < 1e-4
    assert litellm_token_prices("openai/no-such-model-anywhere") is None


def test_decision_puts_api_local_and_hybrid_side_by_side() -> None:
    report = evaluation([0.0] * 10, [1.0] * 8 + [0.0] * 2)
    report["teacher"] |= {"gold": False, "interval": score_interval([1.0] * 10),
                          "latency_p50_ms": 800.0, "latency_p95_ms": 1500.0,
                          "prompt_tokens_per_call": 400.0,
                          "completion_tokens_per_call": 20.0}  # fmt: skip
    report["students"][1] |= {"n": 10, "interval": score_interval([1.0] * 8 + [0.0] * 2),
                              "latency_mean_ms": 500.0}  # fmt: skip
    calibration = {"variant": "Q8_0", "threshold": 0.5, "test": {
        "system_quality": 0.9, "system_interval": score_interval([1.0] * 9 + [0.0]),
        "fallback_rate": 0.2, "fallback_interval": wilson_interval(2, 10),
        "latency_p50_ms": 510.0, "latency_p95_ms": 1900.0}}  # fmt: skip
    prices = CostSpec(api_input_per_1m_tokens=0.15, api_output_per_1m_tokens=0.60,
                      local_per_hour=0.36)  # fmt: skip
    decision = decide(report, calibration, prices=prices, teacher_model="openai/x")
    assert decision["retention"] == pytest.approx(0.8) and decision["band"] == "good"
    assert decision["api"]["cost"]["per_1k_calls"] == pytest.approx(0.072)
    assert decision["local"]["cost_per_1k_calls"] == pytest.approx(0.05)
    assert decision["hybrid"]["cost_per_1k_calls"] == pytest.approx(0.05 + 0.2 * 0.072)
    table = {row[0]: row[1:] for row in decision_rows(decision)}
    assert table["latency p50 / p95 ms"] == ["800 / 1500", "1 / 2", "510 / 1900"]
    assert table["tokens per call"][0] == "400 in / 20 out"
    assert table["data leaves the machine"] == ["yes, every call", "no", "yes, for 20% of calls"]
    assert table["runs offline"][:2] == ["no", "yes"]


def test_a_teacher_that_scores_zero_leaves_no_retention_to_report() -> None:
    """A misconfigured teacher (or metric) scores 0: the build says to check them, rather
    than "keeps 0%, use a larger student"."""
    from services.builder.context import gate
    from services.builder.report import verdict_line
    from services.builder.spec import BuildSpec

    report = evaluation([0.0] * 10, [0.0] * 10)
    report["teacher"] |= {
        "score": 0.0,
        "examples": [{"score": 0.0}] * 10,
        "interval": score_interval([0.0] * 10),
    }
    report["students"][1] |= {"n": 10, "interval": score_interval([0.0] * 10),
                              "latency_mean_ms": 5.0}  # fmt: skip
    calibration = {"variant": "Q8_0", "threshold": 0.0, "test": {
        "system_quality": 0.0, "system_interval": score_interval([0.0] * 10),
        "fallback_rate": 0.0, "fallback_interval": wilson_interval(0, 10),
        "latency_p50_ms": 5.0, "latency_p95_ms": 6.0}}  # fmt: skip
    decision = decide(report, calibration, prices=CostSpec(), teacher_model="openai/x")
    assert decision["band"] == "no teacher quality"
    assert verdict_line(decision).startswith("retention: none to measure, n=10: check the teacher")
    assert [row[3] for row in rows(report)] == ["—", "—", "—"]
    spec = BuildSpec.model_validate({"name": "t", "program": "p:q",
                                     "data": {"train": "t.jsonl", "dev": "d.jsonl"}})  # fmt: skip
    verdict = gate(report, spec, "Q8_0")
    assert verdict["teacher_score"] == 0.0 and not verdict["passed"]


def test_label_fields_and_imbalance_warnings() -> None:
    import dspy

    from services.builder.data import imbalance, label_counts, label_fields

    rows = [dspy.Example(q=f"q{i}", label=["a", "b", "c"][i % 3], text=f"free {i}")
            for i in range(12)]  # fmt: skip
    assert label_fields(rows, ["label", "text"]) == ["label"]  # 12 distinct texts: free text
    assert imbalance(label_counts(rows, "label"), 3) is None  # 4 / 4 / 4
    skewed = rows + [dspy.Example(q="x", label="a", text="t")] * 30
    assert imbalance(label_counts(skewed, "label"), 3) == "'a' is 81% of the rows"
    assert imbalance(label_counts(rows[:1], "label"), 3) == "'a' is 100% of the rows"
    # typed labels are counted as an answer writes them: an Enum by its value, a list as JSON
    priority = enum.Enum("Priority", {"LOW": "low", "HIGH": "high"})
    typed = [dspy.Example(p=priority.LOW, tags=["a", "b"]),
             dspy.Example(p="low", tags='["a", "b"]')]  # fmt: skip
    assert label_counts(typed, "p") == {"low": 2}
    assert label_counts(typed, "tags") == {'["a", "b"]': 2}


def test_a_held_out_label_no_train_row_has_is_named() -> None:
    from collections import Counter

    from services.builder.data import unseen_in_train

    train = Counter({"pos": 6, "neg": 6})
    said = unseen_in_train(Counter({"neu": 1, "neg": 1, "mixed": 2}), train)
    assert said is not None and said.startswith("'mixed', 'neu' (3 of 4 rows) in no train row")
    assert unseen_in_train(Counter({"neg": 3}), train) is None
    assert unseen_in_train(Counter({"neu": 1}), Counter()) is None  # train unlabelled: API teacher
    # a `str` field with few values may be read from the input (extraction): said both ways
    free = unseen_in_train(Counter({"lyon": 2}), Counter({"oslo": 2}), choice=False)
    assert free is not None and "as labels the student never sees them" in free
    assert "values read from the input need none" in free


def test_split_by_group_keeps_each_labels_share_when_stratified() -> None:
    # 8 problems told twice: 6 labelled "a" (12 rows), 2 labelled "b" (4 rows).
    groups = [f"p{i}" for i in range(8) for _ in range(2)]
    labels = ["a" if i < 6 else "b" for i in range(8) for _ in range(2)]
    for seed in range(5):
        calibration, test = split_by_group(groups, 0.5, seed, strata=labels)
        assert [labels[i] for i in calibration].count("a") == 6
        assert [labels[i] for i in calibration].count("b") == 2
        assert not {groups[i] for i in calibration} & {groups[i] for i in test}


# -- comparing typed answers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("gold", "answer", "equal"),
    [
        (3, "3", True), (3, "3.0", True), (3, "4", False), (True, "True", True),
        (False, "true", False), (["Home", "light"], '["home", "light"]', True),
        (["home"], "['home']", True), (["home", "light"], '["light", "home"]', False),
        ({"item": "Mug", "quantity": 2}, '{"quantity": 2, "item": "mug"}', True),
        ({"item": "mug", "quantity": 2}, '{"item": "mug", "quantity": 3}', False),
        ("Account  Access", "account access", True), ("billing", "[billing", False),
    ],
)  # fmt: skip
def test_answers_compare_as_data_without_case_or_spacing(
    gold: Any, answer: str, equal: bool
) -> None:
    import dspy

    from services.builder.metrics import exact_match

    example = dspy.Example(q="x", out=gold).with_inputs("q")
    assert exact_match(example, dspy.Prediction(out=answer)) is equal


def test_a_user_metric_sees_the_signature_types_whoever_answered() -> None:
    """A student's answer reaches the build as text; the metric gets the program's types, as a
    teacher's DSPy prediction has them."""
    import dspy

    from services.builder.metrics import TypedMetric, score
    from services.core.program import output_annotations

    class Extract(dspy.Signature):
        message: str = dspy.InputField()
        line: Line = dspy.OutputField()
        priority: int = dspy.OutputField()
        urgent: bool = dspy.OutputField()

    def metric(example: Any, prediction: Any, trace: Any = None) -> bool:
        same_line = prediction.line.quantity == example.line["quantity"]
        return bool(same_line and prediction.priority == example.priority
                    and prediction.urgent is False)  # fmt: skip

    example = dspy.Example(message="2 mugs", line={"item": "mug", "quantity": 2}, priority=3,
                           urgent=False).with_inputs("message")  # fmt: skip
    text = {"line": '{"item": "mug", "quantity": 2}', "priority": "3", "urgent": "False"}
    typed = TypedMetric(metric, output_annotations(dspy.Predict(Extract)))
    assert score(typed, example, text) == 1.0
    assert score(typed, example, {**text, "priority": "2"}) == 0.0
    with pytest.raises(AttributeError):  # the text alone: no .quantity on a str
        score(metric, example, text)
    teacher = dspy.Prediction(line=Line(item="mug", quantity=2), priority=3, urgent=False)
    assert typed(example, teacher) is True
    # What does not parse reaches the metric as it came; the metric's error scores 0, as in
    # DSPy's Evaluate, and is kept for the stage's warning and the report.
    assert score(typed, example, {**text, "line": "not json"}) == 0.0
    assert typed.errors_since(0) == {
        "count": 1, "first": "AttributeError: 'str' object has no attribute 'quantity'"
    }  # fmt: skip
    assert typed.errors_since(1) is None


def test_a_user_metric_is_checked_on_the_labels_before_the_build() -> None:
    """A metric that raises on a train row's own labels is broken: the build stops before
    the teacher and the fine-tune. One scoring every label under the threshold is warned of."""
    import dspy

    from services.builder.metrics import TypedMetric, check_metric
    from services.builder.spec import SpecError

    rows = [dspy.Example(q=f"{i}", stars=i % 5 + 1).with_inputs("q") for i in range(10)]

    def typo(example: Any, prediction: Any) -> bool:
        return bool(prediction.star == example.stars)

    def close(example: Any, prediction: Any) -> float:
        return 1 - abs(prediction.stars - int(example.stars)) / 4

    def harsh(example: Any, prediction: Any) -> float:
        return 0.3 * close(example, prediction)

    def check(metric: Any, threshold: float = 0.5) -> str | None:
        return check_metric(TypedMetric(metric, {"stars": int}), "m:f", rows, ["stars"], threshold)

    with pytest.raises(SpecError, match=r"metric: m:f raised AttributeError.*row 1"):
        check(typo)
    assert check(close) is None  # handed ints, as typed
    assert "at most 0.3, under metric_threshold 0.5" in (check(harsh) or "")
    assert check(harsh, threshold=0.3) is None
    assert check_metric(TypedMetric(typo, {}), "exact_match", rows, ["stars"], 1.0) is None

    # A field named like a method of dspy.Example: `example.items` is the method.
    listed = [dspy.Example(q="x", items=["mug"]).with_inputs("q")]

    def reads_items(example: Any, prediction: Any) -> float:
        return float(sorted(example.items) == sorted(prediction.items))

    def compares_items(example: Any, prediction: Any) -> float:
        return float(example.items == prediction.items)

    hint = "'items' also names a method of dspy.Example and dspy.Prediction"
    with pytest.raises(
        SpecError, match=re.escape(hint) + r".*read the field as example\['items'\]"
    ):
        check_metric(TypedMetric(reads_items, {}), "m:f", listed, ["items"], 1.0)
    assert hint in (check_metric(TypedMetric(compares_items, {}), "m:f", listed, ["items"], 1.0)
                    or "")  # fmt: skip
    with pytest.raises(SpecError) as raised:
        check(typo)
    assert "Note:" not in str(raised.value)  # no field shadows a method


def test_a_metric_that_returns_no_score_is_a_clear_error_not_a_traceback() -> None:
    """None (a metric that forgot `return`), text or NaN is no score: the check on the labels
    and a score in the build say so, naming the metric; a bool or a dspy.Prediction's
    `score` (GEPA's feedback metrics) is one."""
    import dspy

    from services.builder.metrics import TypedMetric, check_metric, score
    from services.builder.spec import SpecError

    rows = [dspy.Example(q="1", stars=3).with_inputs("q")]

    def forgot_return(example: Any, prediction: Any) -> None:
        _ = example.stars == prediction.stars

    def only_when_right(example: Any, prediction: Any) -> float | None:
        return 1.0 if example.stars == prediction.stars else None

    def with_feedback(example: Any, prediction: Any) -> Any:
        return dspy.Prediction(score=0.5, feedback="close")

    with pytest.raises(SpecError, match=r"m:f returned None scoring data.train row 1 .*return"):
        check_metric(TypedMetric(forgot_return, {}), "m:f", rows, ["stars"], 1.0)
    lenient = TypedMetric(only_when_right, {"stars": int})
    assert check_metric(lenient, "m:f", rows, ["stars"], 1.0) is None  # right on its labels
    with pytest.raises(SpecError, match=r"only_when_right returned None for an answer"):
        score(lenient, rows[0], {"stars": 4})
    assert score(TypedMetric(with_feedback, {}), rows[0], {"stars": 3}) == 0.5
    assert score(TypedMetric(lambda e, p: True, {}), rows[0], {"stars": 3}) == 1.0
    with pytest.raises(SpecError, match="returned 'nan'"):
        score(TypedMetric(lambda e, p: "nan", {}), rows[0], {"stars": 3})

    # A model label read as DSPy hands a row's JSON (a dict): the build hands the model.
    class Item(BaseModel):
        product: str
        quantity: int

    ordered = [dspy.Example(q="x", items=[Item(product="mug", quantity=2)]).with_inputs("q")]

    def reads_dicts(example: Any, prediction: Any) -> float:
        return float({i["product"] for i in example["items"]} == {"mug"})

    with pytest.raises(SpecError) as raised:
        check_metric(TypedMetric(reads_dicts, {"items": list[Item]}), "m:f", ordered, ["items"], 1)
    assert "The labels of 'items' are Item objects" in str(raised.value)
    assert "`value.product`" in str(raised.value) and "Note:" not in str(raised.value)


def test_the_builtin_metrics_score_the_fields_the_program_answers() -> None:
    """A row's other columns (an id) and intermediate labels are not compared; a prediction
    that answers none of the labels scores 0, not a vacuous 1."""
    import dspy

    from services.builder.metrics import exact_match, token_f1

    row = dspy.Example(q="x", topic="net", reply="We are on it", id=7).with_inputs("q")
    assert exact_match(row, dspy.Prediction(reply="we are  on it")) is True
    assert exact_match(row, dspy.Prediction(reply="we are on it", topic="hw")) is False
    assert exact_match(row, dspy.Prediction()) is False
    assert token_f1(row, dspy.Prediction(reply="we are")) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert token_f1(row, dspy.Prediction(other="x")) == 0.0


def test_a_none_label_of_an_optional_field_matches_the_answer_trained_on_it() -> None:
    """ChatAdapter writes None as `None` (the student is trained on that text) and DSPy's
    parser keeps it as the text for `str | None`: answered `None`, the value is None on the
    wire, to a user's metric and to the built-in ones; a real product is not None."""
    import dspy

    from services.builder.metrics import TypedMetric, exact_match
    from services.core.program import ProgramSpec, PromptCodec, output_annotations

    signature = dspy.Signature(
        {"review": (str, dspy.InputField()), "product": (Optional[str], dspy.OutputField()),  # noqa: UP045
         "stars": (int | None, dspy.OutputField())}, "Extract.")  # fmt: skip
    codec = PromptCodec(ProgramSpec.from_signature(signature))
    trained = codec.format_assistant({"product": None, "stars": None})
    parsed = codec.parse(trained)
    assert parsed is not None and json.loads(parsed.outputs_json) == {
        "product": None,
        "stars": None,
    }
    row = dspy.Example(review="meh", product=None, stars=None).with_inputs("review")
    seen = []
    typed = TypedMetric(lambda e, p: seen.append(p.product) or p.product == e.product,
                        output_annotations(dspy.Predict(signature)))  # fmt: skip
    assert typed(row, dspy.Prediction(**parsed.outputs)) is True and seen == [None]
    assert exact_match(row, dspy.Prediction(**parsed.outputs)) is True
    assert exact_match(row, dspy.Prediction(product="mug", stars="None")) is False
    assert (
        exact_match(row.copy(product="mug"), dspy.Prediction(product="None", stars="None")) is False
    )


def test_a_two_parameter_metric_is_not_handed_the_optimizers_trace() -> None:
    import dspy

    from services.builder.metrics import TypedMetric, exact_match

    def loose(example: Any, prediction: Any) -> bool:
        return bool(prediction.answer)

    row = dspy.Example(q="x", answer="4").with_inputs("q")
    assert TypedMetric(loose, {})(row, dspy.Prediction(answer="4"), trace=[("call",)]) is True
    assert TypedMetric(exact_match, {"answer": int})(row, dspy.Prediction(answer="4"), [1])


def test_exact_match_on_a_free_text_output_is_warned_of() -> None:
    """A reply that is a sentence of its own in every row is free text: exact_match would
    score a paraphrase 0. A label field (a Literal, or few values repeated) is not warned of."""
    import dspy

    from services.builder.context import exact_match_on_free_text

    rows = [dspy.Example(q=f"{n}", topic="net" if n % 2 else "hw", reply=f"We fixed ticket {n}.")
            for n in range(12)]  # fmt: skip
    said = exact_match_on_free_text("exact_match", rows, ["topic", "reply"], [])
    assert said is not None and "compares 'reply' (free text" in said and "token_f1" in said
    assert "'topic'" not in said
    assert exact_match_on_free_text("token_f1", rows, ["topic", "reply"], []) is None
    assert exact_match_on_free_text("exact_match", rows, ["topic"], []) is None
    # a number or an optional number of its own per row is data, not wording
    aged = [dspy.Example(q=f"{n}", age=n, floor=None if n % 3 else n) for n in range(12)]
    types = {"age": int, "floor": int | None, "reply": str | None}
    assert exact_match_on_free_text("exact_match", aged, ["age", "floor"], [], types) is None
    said = exact_match_on_free_text("exact_match", rows, ["reply"], [], types)
    assert said is not None and "'reply'" in said


def test_a_retention_range_over_several_bands_says_the_rows_are_too_few() -> None:
    """36% kept on 11 test rows (15%–65%) is no verdict on the student: the line names the
    bands the range reaches. A range within one band reads as before."""
    from services.builder.decision import bands_spanned
    from services.builder.report import verdict_line

    assert bands_spanned(0.15, 0.65) == ["re-distill", "larger model or hybrid"]
    assert bands_spanned(0.91, 1.0) == ["deploy"]
    wide = {"retention": 0.36, "retention_range": [0.15, 0.65], "n": 11,
            "api": {"quality": 1.0}, "band": "larger model or hybrid",
            "next_step": "distill into a larger student, or serve hybrid"}  # fmt: skip
    assert (
        "larger model or hybrid (the range reaches from larger model or hybrid to "
        "re-distill: more held-out rows would settle the band); next step"
    ) in verdict_line(wide)
    narrow = {**wide, "retention": 0.95, "retention_range": [0.91, 1.0], "band": "deploy"}
    assert "settle" not in verdict_line(narrow)
    # What is retained is said: a weak teacher's quality kept whole is still weak.
    weak = {**narrow, "retention": 1.0, "api": {"quality": 0.381}}
    assert verdict_line(weak).startswith("retention 100% of the teacher's 38.1% (95% range")


def test_a_typed_free_field_is_scored_by_its_data_not_its_python_repr() -> None:
    """A list of models labelled in the row (typed as the signature says) and the same list
    answered (JSON data, as eval.json keeps it) are the same words: the gold teacher's own
    labels score 1 per field, a wrong quantity less."""
    import dspy

    from services.builder.evaluate import field_scores
    from services.builder.metrics import token_f1

    class Item(BaseModel):
        product: str
        quantity: int

    gold = [dspy.Example(q="x", items=[Item(product="mug", quantity=2)]).with_inputs("q")]
    same = [{"split": "test", "outputs": {"items": [{"product": "mug", "quantity": 2}]}}]
    other = [{"split": "test", "outputs": {"items": [{"product": "mug", "quantity": 3}]}}]
    assert field_scores(gold, same, [], free_text=["items"])["items"]["score"] == 1.0
    assert field_scores(gold, other, [], free_text=["items"])["items"]["score"] < 1.0
    answered = dspy.Prediction(items=[{"product": "mug", "quantity": 2}])
    assert token_f1(gold[0], answered) == 1.0
    # an optional number answered None (the text `None`, as served) is its None label
    ages = [dspy.Example(q="x", age=None), dspy.Example(q="y", age=51)]
    answers = [{"split": "test", "outputs": {"age": "None"}},
               {"split": "test", "outputs": {"age": "51"}}]  # fmt: skip
    assert field_scores(ages, answers, [], free_text=["age"])["age"]["score"] == 1.0
    none = [dspy.Example(q="y", items=[]).with_inputs("q")]
    assert token_f1(none[0], dspy.Prediction(items="[]")) == 1.0  # no order, none answered
    assert token_f1(none[0], dspy.Prediction(items="{}")) == 0.0
    assert token_f1(none[0], answered) == 0.0
