"""Predict's semantics, shared by the gRPC service and the builder's evaluation.

Format inputs with the program's codec, generate (greedy by default) until the completion
marker, parse the output fields, and score confidence from the value tokens' probabilities.
"""

from __future__ import annotations

import math
import secrets
import time
import weakref
from dataclasses import dataclass, replace
from typing import Literal

from services.core.pipeline import LmCall
from services.core.program import COMPLETED_MARKER, PromptCodec
from services.core.sampling import SAMPLING_DEFAULTS
from services.runtime.backends import Backend, Finished, GenerationParams, TokenPiece
from services.runtime.backends.base import PreparedPrompt
from services.runtime.structured import OutputPlan, Tokenizer, build_plan

Outcome = Literal["parsed", "unparsed", "truncated"]


@dataclass
class Interpretation:
    outputs: dict[str, str] | None
    confidence: float
    outcome: Outcome
    outputs_json: str  # the outputs typed, in the signature's order ("" when not parsed)


@dataclass
class PredictResult(Interpretation):
    raw_text: str
    finished: Finished
    latency_s: float
    first_token_s: float | None


def predict_params(max_tokens: int, temperature: float = 0.0,
                   top_p: float = SAMPLING_DEFAULTS.top_p,
                   seed: int | None = None) -> GenerationParams:  # fmt: skip
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=secrets.randbelow(2**31) if seed is None else seed,
        stop=(COMPLETED_MARKER,),
        logprobs=True,
    )


# backend -> codec -> plan, forgotten with either
_PLANS: weakref.WeakKeyDictionary[object, weakref.WeakKeyDictionary[PromptCodec, OutputPlan]] = (
    weakref.WeakKeyDictionary()
)


def output_plan(backend: Backend, codec: PromptCodec) -> OutputPlan | None:
    """The codec's typed-decoding plan on this backend (made once), or None when the backend
    cannot decode by plan (it does not expose its tokenizer and logits)."""
    if not hasattr(backend, "tokenize_text"):
        return None
    plans = _PLANS.setdefault(backend, weakref.WeakKeyDictionary())
    if codec not in plans:
        tokenizer: Tokenizer = backend  # type: ignore[assignment]
        plans[codec] = build_plan(codec, tokenizer)
    return plans[codec]


def prepare_answer(
    backend: Backend, codec: PromptCodec, messages: list[dict[str, str]], *, typed: bool = True
) -> PreparedPrompt:
    """A predictor call's prompt; `typed`: decoded by the codec's plan (the scaffold forced,
    values constrained by their types) where the backend can."""
    prompt = backend.prepare(messages)
    plan = output_plan(backend, codec) if typed and prompt.tokens is not None else None
    if plan is None:
        return prompt
    assert prompt.tokens is not None
    return replace(
        prompt, text=prompt.text + plan.header_text, tokens=prompt.tokens + plan.header, plan=plan
    )


def interpret(
    codec: PromptCodec, text: str, pieces: list[TokenPiece], finished: Finished
) -> Interpretation:
    typed = finished.field_confidence is not None
    # A typed answer is complete only where its plan ended it: cut short, a value is partial.
    answer = None if typed and finished.reason == "length" else codec.parse(text)
    if answer is None:
        outcome: Outcome = "truncated" if finished.reason == "length" else "unparsed"
        return Interpretation(None, 0.0, outcome, "")
    if finished.field_confidence is not None:  # typed decoding scored each value itself
        scores = [finished.field_confidence.get(name, 0.0) for name in codec.output_names]
        return Interpretation(answer.outputs, min(scores), "parsed", answer.outputs_json)
    score = confidence(answer.spans, pieces)
    return Interpretation(answer.outputs, score, "parsed", answer.outputs_json)


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
    backend: Backend, codec: PromptCodec, inputs: dict[str, str], params: GenerationParams,
    *, typed: bool = True,
) -> PredictResult:  # fmt: skip
    """One synchronous Predict, without the server (evaluation, calibration, tools)."""
    return complete_once(backend, codec, codec.format_messages(inputs), params, typed=typed)


def lm_call(name: str, text: str, result: Interpretation, finished: Finished) -> LmCall:
    """A predictor call's record, for a multi-step program's run."""
    return LmCall(
        predictor=name, text=text, confidence=result.confidence, outcome=result.outcome,
        prompt_tokens=finished.prompt_tokens, completion_tokens=finished.completion_tokens,
        cached_prompt_tokens=finished.cached_prompt_tokens, decode_steps=finished.decode_steps,
    )  # fmt: skip


def complete_once(
    backend: Backend, codec: PromptCodec, messages: list[dict[str, str]],
    params: GenerationParams, *, typed: bool = True,
) -> PredictResult:  # fmt: skip
    """One synchronous call of a predictor whose prompt is already formatted."""
    started = time.perf_counter()
    prompt = prepare_answer(backend, codec, messages, typed=typed)
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
        outputs_json=result.outputs_json,
        raw_text=text,
        finished=finished,
        latency_s=time.perf_counter() - started,
        first_token_s=first,
    )
