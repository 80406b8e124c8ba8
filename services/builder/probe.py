"""Rows the model in training answers greedily, scored as the evaluation scores them.

Two uses: choosing the checkpoint on the calibration part (never the test part), and each
output field's accuracy on a sample of train rows when training ends, so that a low loss that
only means "learned the output format" shows as what it is.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.builder.data import Metric, field_matches, score
from services.core.program import PromptCodec


@dataclass(frozen=True)
class ProbeResult:
    score: float  # the metric's mean
    fields: dict[str, float]  # each label field: fraction answered exactly
    parsed: float  # fraction of answers that parse
    n: int

    def as_dict(self) -> dict[str, Any]:
        return {"score": self.score, "fields": self.fields, "parsed": self.parsed, "n": self.n}


@dataclass(frozen=True)
class Probe:
    name: str
    prompts: list[list[dict[str, str]]]  # chat messages, as served
    score: Callable[[list[str]], ProbeResult]  # the completions, in order -> their score


def make_probe(
    name: str, codec: PromptCodec, metric: Metric, examples: list[Any], fields: list[str]
) -> Probe:
    """A probe over `examples`; `fields` are the label fields counted one by one."""
    inputs = codec.input_names
    prompts = [codec.format_messages({k: str(e[k]) for k in inputs}) for e in examples]

    def score_completions(completions: list[str]) -> ProbeResult:
        parsed = [codec.parse(text) for text in completions]
        outputs = [answer.outputs if answer else None for answer in parsed]
        scores = [score(metric, e, out) for e, out in zip(examples, outputs, strict=True)]
        right = {
            field: statistics.fmean(
                field_matches(e, out, field) for e, out in zip(examples, outputs, strict=True)
            )
            for field in fields
        }
        return ProbeResult(
            score=statistics.fmean(scores), fields=right,
            parsed=statistics.fmean(out is not None for out in outputs), n=len(examples),
        )  # fmt: skip

    return Probe(name, prompts, score_completions)


def sample(examples: list[Any], size: int, seed: int) -> list[Any]:
    """A fixed sample: the same rows at every probe of one build."""
    if len(examples) <= size:
        return list(examples)
    return random.Random(seed).sample(examples, size)
