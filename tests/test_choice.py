"""Choosing the shipped student among candidates: a pure function of their figures and the
spec's budgets."""

from __future__ import annotations

from typing import Any

import pytest

from services.builder.choice import Candidate, NoStudentFits, choose, comparison
from services.builder.package import modelfile
from services.builder.spec import StudentChoice


def make(source: str, score: float, size_mb: float, p50: float = 100.0, **extra: Any) -> Candidate:
    fields: dict[str, Any] = {
        "source": source, "description": source, "quantization": "Q8_0", "n": 60,
        "score": score, "interval": (score - 0.1, min(1.0, score + 0.05)),
        "latency_p50_ms": p50, "tokens_per_s": None, "size_mb": size_mb, "peak_rss_mb": 300.0,
        "training_s": 60.0, "passed_gate": True, "build_dir": f"build/students/{source}",
    }  # fmt: skip
    return Candidate(**{**fields, **extra})


SMALL, LARGE = make("default", 0.90, 145), make("gemma3-270m", 0.95, 290, p50=240)


def test_best_score_ships_by_default() -> None:
    assert choose([SMALL, LARGE], StudentChoice()) is LARGE


def test_equal_scores_go_to_the_smaller_file() -> None:
    twin = make("gemma3-270m", 0.90, 290)
    assert choose([twin, SMALL], StudentChoice()) is SMALL


@pytest.mark.parametrize(
    "rule", [StudentChoice(max_latency_ms=200), StudentChoice(max_size_mb=200)]
)
def test_a_budget_excludes_the_better_but_larger_student(rule: StudentChoice) -> None:
    assert choose([SMALL, LARGE], rule) is SMALL
    table = comparison([SMALL, LARGE], SMALL, rule)
    excluded = {c["source"]: c["excluded"] for c in table["candidates"]}
    assert excluded["default"] == [] and len(excluded["gemma3-270m"]) == 1


def test_a_student_that_failed_its_gate_never_ships() -> None:
    failed = make("gemma3-270m", 0.99, 290, passed_gate=False)
    assert choose([SMALL, failed], StudentChoice()) is SMALL


def test_no_student_within_budget_is_a_clear_error() -> None:
    with pytest.raises(NoStudentFits, match=r"default: 145 MB > 100 MB.*choice.max_size_mb"):
        choose([SMALL, LARGE], StudentChoice(max_size_mb=100))


def test_a_gemma_bundle_gets_gemmas_turns_in_its_modelfile() -> None:
    text = modelfile("x.Q8_0.gguf", "{{ bos_token }}<start_of_turn>user\n...")
    assert "<start_of_turn>model" in text and 'PARAMETER stop "<end_of_turn>"' in text
    chatml = modelfile("x.Q8_0.gguf", "<|im_start|>{{ role }}")
    assert 'PARAMETER stop "<|im_end|>"' in chatml
