"""llama.cpp's server's own API: `/completion` (a text continued, whole or streamed) and
`/apply-template` (a chat as the prompt the model is given), as Generate and Tokenize calls;
`/props` and `/slots` (how it serves), from GetModelInfo. Pure functions."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

from pydantic import Field

from services import __version__
from services.core.api import pb
from services.core.http_api.chat import (
    BadRequest,
    Body,
    LogitBias,
    Message,
    chat_messages,
    token_biases,
)
from services.core.sampling import (
    GENERATE_DEFAULT_TEMPERATURE,
    SAMPLING_DEFAULTS,
    TOP_LOGPROBS_LIMIT,
)

_STOP_TYPE = {pb.FINISH_REASON_STOP: "eos", pb.FINISH_REASON_LENGTH: "limit",
              pb.FINISH_REASON_STOP_SEQUENCE: "word"}  # fmt: skip


class CompletionBody(Body):
    """`POST /completion`'s request (keys it does not serve, `cache_prompt` among them, are
    ignored: the runtime reuses whatever its cache holds)."""

    prompt: str = Field(min_length=1)
    n_predict: int | None = None  # -1: the server's default
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None  # -1: random
    stop: list[str] = Field(default_factory=list)
    grammar: str = ""
    json_schema: dict[str, Any] | None = None
    logit_bias: LogitBias = None
    n_probs: int = Field(0, ge=0, le=TOP_LOGPROBS_LIMIT)
    stream: bool = False


class TemplateBody(Body):
    messages: list[Message] = Field(min_length=1)


def completion_call(body: CompletionBody) -> pb.GenerateRequest:
    """The Generate call: the prompt continued as it is (the beginning-of-text token added)."""
    if body.n_predict == 0:
        raise BadRequest("n_predict", "must be positive (-1: the server's default)")
    options = pb.SamplingOptions(
        max_tokens=body.n_predict if body.n_predict and body.n_predict > 0 else None,
        temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p,
        repeat_penalty=body.repeat_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed if body.seed is None or body.seed >= 0 else None,
    )  # fmt: skip
    biases = token_biases(body.logit_bias)
    return pb.GenerateRequest(
        prompt=body.prompt, options=options, stop=body.stop, grammar=body.grammar,
        json_schema=json.dumps(body.json_schema) if body.json_schema is not None else "",
        logit_bias=biases, logprobs=body.n_probs > 0, top_logprobs=body.n_probs,
    )  # fmt: skip


def completion_answer(chunks: list[pb.GenerateChunk], model: str, prompt: str) -> dict[str, Any]:
    """The whole answer, as llama.cpp's server gives it."""
    return final_event(chunks[-1], "".join(c.text for c in chunks), model, prompt,
                       [item for chunk in chunks for item in chunk.logprobs])  # fmt: skip


def completion_events(
    chunks: Iterator[pb.GenerateChunk], model: str, prompt: str
) -> Iterator[dict[str, Any]]:
    """The streamed answer: each piece of text (with its tokens' probabilities when asked
    for), then a last event with `stop` and the accounting (its `content` empty)."""
    for chunk in chunks:
        if chunk.text:
            yield {"content": chunk.text, "tokens": [], "stop": False, "id_slot": 0,
                   **_probabilities(chunk.logprobs)}  # fmt: skip
        if chunk.finish_reason:
            yield final_event(chunk, "", model, prompt, [])


def final_event(
    last: pb.GenerateChunk, content: str, model: str, prompt: str,
    listed: list[pb.GeneratedTokenLogprob],
) -> dict[str, Any]:  # fmt: skip
    usage = last.usage
    prompt_ms = last.time_to_first_token_ms
    predicted_ms = max(last.latency_ms - prompt_ms, 0.0)
    evaluated = usage.prompt_tokens - usage.cached_prompt_tokens
    return {
        "content": content, "tokens": [], "id_slot": 0, "stop": True, "model": model,
        "tokens_predicted": usage.completion_tokens, "tokens_evaluated": usage.prompt_tokens,
        "tokens_cached": usage.cached_prompt_tokens, "prompt": prompt,
        "has_new_line": "\n" in content, "truncated": False,
        "stop_type": _STOP_TYPE.get(last.finish_reason, "none"),
        "stopping_word": last.stop_sequence,
        "timings": {
            "cache_n": usage.cached_prompt_tokens, "prompt_n": evaluated, "prompt_ms": prompt_ms,
            "prompt_per_second": _rate(evaluated, prompt_ms),
            "predicted_n": usage.completion_tokens, "predicted_ms": predicted_ms,
            "predicted_per_second": _rate(usage.completion_tokens, predicted_ms),
        },
        **_probabilities(listed),
    }  # fmt: skip


def template_call(body: TemplateBody) -> pb.TokenizeRequest:
    return pb.TokenizeRequest(messages=chat_messages(body.messages), with_pieces=True)


def template_answer(reply: pb.TokenizeResponse) -> dict[str, Any]:
    """The chat as the prompt text the model is given (special tokens as their text)."""
    return {"prompt": b"".join(piece.bytes for piece in reply.pieces).decode("utf-8", "replace")}


def props_answer(info: pb.ModelInfo) -> dict[str, Any]:
    """`GET /props`, as llama.cpp's server describes itself: the context, the slots, the
    defaults a call that sets none gets (Generate's), and the chat template with its tokens
    (a client rendering a chat with it gets what `/apply-template` gives)."""
    params = {"n_predict": info.max_tokens_default, "temperature": GENERATE_DEFAULT_TEMPERATURE,
              **dataclasses.asdict(SAMPLING_DEFAULTS)}  # fmt: skip
    return {
        "default_generation_settings": {"n_ctx": info.context_length, "params": params},
        "total_slots": info.parallel,
        "model_alias": info.model_name,
        "model_path": "",  # the served file is the runtime host's business, not its clients'
        "chat_template": info.chat_template,
        "bos_token": info.bos_token,
        "eos_token": info.eos_token,
        "modalities": {"vision": False, "audio": False},
        "build_info": f"edgedistill {__version__}",
    }


def slots_answer(info: pb.ModelInfo) -> list[dict[str, Any]]:
    """`GET /slots`, in llama.cpp's server's terms: each slot's context, whether it is
    decoding, and the tokens it has generated for its request; and what it holds (its
    prompt's tokens, its KV cache's). Prompts themselves are not shown."""
    return [
        {"id": slot.id, "n_ctx": info.context_length, "is_processing": slot.processing,
         "n_prompt_tokens": slot.prompt_tokens, "n_held_tokens": slot.held_tokens,
         "next_token": {"n_decoded": slot.decoded_tokens}}
        for slot in info.slots
    ]  # fmt: skip


def no_free_slot(slots: list[dict[str, Any]]) -> bool:
    """`/slots?fail_on_no_slot=1` answers 503 when this holds (a load balancer's check)."""
    return all(slot["is_processing"] for slot in slots)  # none at all: none free


def _probabilities(listed: Any) -> dict[str, Any]:
    """llama.cpp's `completion_probabilities`, when any were asked for."""
    if not listed:
        return {}

    def entry(token: pb.TokenLogprob) -> dict[str, Any]:
        return {"id": token.id, "token": token.token, "logprob": token.logprob,
                "bytes": list(token.bytes)}  # fmt: skip

    return {"completion_probabilities": [
        {**entry(item.token), "top_logprobs": [entry(t) for t in item.top_logprobs]}
        for item in listed
    ]}  # fmt: skip


def _rate(count: int, milliseconds: float) -> float:
    return count * 1000.0 / milliseconds if milliseconds > 0 else 0.0
