"""LM-judged metrics: dspy.evaluate.SemanticF1 over any program's last output field, and what
the judge's calls cost (they are part of the build's bill)."""

from __future__ import annotations

import threading
from typing import Any

from services.builder.data import labelled


class SemanticF1Judge:
    """The metric `semantic_f1`: DSPy's SemanticF1 (the judge LM rates recall and precision of
    the answer's key ideas against the reference; the score is their F1). DSPy's module reads
    `example.question` and `.response`; here the question is every input field and the
    response is the program's last labelled output, so any signature works."""

    def __init__(self, lm: Any) -> None:
        from dspy.evaluate import SemanticF1

        self.lm = lm
        self.module = SemanticF1()
        self.failures = 0
        self._lock = threading.Lock()

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> float:
        import dspy

        field = labelled(list(example.labels()))[-1]
        answer = str(prediction.get(field, "") or "").strip()
        if not answer:
            return 0.0
        question = "\n".join(f"{name}: {value}" for name, value in example.inputs().items())
        reference = dspy.Example(question=question, response=str(example[field]))
        try:
            with dspy.context(lm=self.lm):
                result = self.module(reference, dspy.Prediction(response=answer))
        except Exception:  # an unparseable verdict scores 0 and is counted in the report
            with self._lock:
                self.failures += 1
            return 0.0
        return float(result.score)


def lm_usage(lm: Any) -> dict[str, int]:
    """Calls and tokens an LM has spent, from its history (LiteLLM's usage of each call)."""
    calls = prompt = completion = 0
    for entry in list(getattr(lm, "history", [])):
        usage = entry.get("usage") or {}
        calls += 1
        prompt += int(usage.get("prompt_tokens") or 0)
        completion += int(usage.get("completion_tokens") or 0)
    return {"calls": calls, "prompt_tokens": prompt, "completion_tokens": completion}
