"""Predict's semantics, shared by the gRPC service and the builder's evaluation.

Format inputs with the program's codec, generate (greedy by default) until the completion
marker, parse the output fields, and score confidence from the value tokens' probabilities.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from services.core.pipeline import LmCall
from services.core.program import COMPLETED_MARKER, PromptCodec
from services.runtime.backends import Backend, Finished, GenerationParams, TokenPiece

Outcome = Literal["parsed", "unparsed", "truncated"]


@dataclass
class Interpretation:
    outputs: dict[str, str] | None
    confidence: float
    outcome: Outcome


@dataclass
class PredictResult(Interpretation):
    raw_text: str
    finished: Finished
    latency_s: float
    first_token_s: float | None


def predict_params(max_tokens: int, temperature: float = 0.0, top_p: float = 0.95,
                   seed: int | None = None) -> GenerationParams:  # fmt: skip
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=secrets.randbelow(2**31) if seed is None else seed,
        stop=(COMPLETED_MARKER,),
        logprobs=True,
    )


def interpret(
    codec: PromptCodec, text: str, pieces: list[TokenPiece], finished: Finished
) -> Interpretation:
    answer = codec.parse(text)
    if answer is None:
        outcome: Outcome = "truncated" if finished.reason == "length" else "unparsed"
        return Interpretation(None, 0.0, outcome)
    return Interpretation(answer.outputs, confidence(answer.spans, pieces), "parsed")


def confidence(spans: dict[str, tuple[int, int]], pieces: list[TokenPiece]) -> float:
    """Lowest over fields of the geometric-mean probability of the field value's tokens."""
    worst = 1.0
    for start, end in spans.values():
        logprobs = [
            p.logprob for p in pieces if p.logprob is not None and p.start < end and p.end > start
        ]
        if not logprobs:
            if end > start:
                return 0.0  # no probabilities reported: claim nothing
            continue
        worst = min(worst, math.exp(sum(logprobs) / len(logprobs)))
    return max(0.0, min(1.0, worst))


def predict_once(
    backend: Backend, codec: PromptCodec, inputs: dict[str, str], params: GenerationParams
) -> PredictResult:
    """One synchronous Predict, without the server (evaluation, calibration, tools)."""
    return complete_once(backend, codec, codec.format_messages(inputs), params)


def lm_call(name: str, text: str, result: Interpretation, finished: Finished) -> LmCall:
    """A predictor call's record, for a multi-step program's run."""
    return LmCall(
        predictor=name, text=text, confidence=result.confidence, outcome=result.outcome,
        prompt_tokens=finished.prompt_tokens, completion_tokens=finished.completion_tokens,
        cached_prompt_tokens=finished.cached_prompt_tokens,
    )  # fmt: skip


def complete_once(
    backend: Backend, codec: PromptCodec, messages: list[dict[str, str]], params: GenerationParams
) -> PredictResult:
    """One synchronous call of a predictor whose prompt is already formatted."""
    started = time.perf_counter()
    prompt = backend.prepare(messages)
    pieces: list[TokenPiece] = []
    first: float | None = None
    finished: Finished | None = None
    for event in backend.generate(prompt, params, lambda: False):
        if isinstance(event, TokenPiece):
            if first is None:
                first = time.perf_counter() - started
            pieces.append(event)
        else:
            finished = event
    assert finished is not None
    text = "".join(p.text for p in pieces) + finished.text
    result = interpret(codec, text, pieces, finished)
    return PredictResult(
        outputs=result.outputs,
        confidence=result.confidence,
        outcome=result.outcome,
        raw_text=text,
        finished=finished,
        latency_s=time.perf_counter() - started,
        first_token_s=first,
    )
