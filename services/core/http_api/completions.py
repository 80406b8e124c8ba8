"""OpenAI's text completions API (`/v1/completions`, as llama.cpp's server serves it) as
Generate calls with a prompt: the text continued as it is, with no chat template. Pure
functions; errors and usage as in the chat API."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from pydantic import Field

from services.core.api import pb
from services.core.http_api.chat import (
    FINISH,
    BadRequest,
    Choices,
    Sampled,
    Streamed,
    refuse_unserved,
    usage,
)
from services.core.sampling import TOP_LOGPROBS_LIMIT


class CompletionRequest(Sampled):
    prompt: str | list[str]
    best_of: int = Field(1, ge=1, le=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_LIMIT)
    suffix: str | None = None


def completion_call(request: CompletionRequest) -> pb.GenerateRequest:
    """The Generate call a text completion request asks for."""
    refuse_unserved(request, {"echo": "echoing the prompt is not served; the client has it",
                              "suffix": "fill-in-the-middle is not served"})  # fmt: skip
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    if len(prompts) != 1:
        raise BadRequest("prompt", f"{len(prompts)} prompts; send one per request")
    if not prompts[0]:
        raise BadRequest("prompt", "must not be empty")
    wanted = request.logprobs is not None  # logprobs=0: each token's own, no alternatives
    return pb.GenerateRequest(
        prompt=prompts[0], options=request.sampling(request.max_tokens), stop=request.stops(),
        grammar=request.grammar, logit_bias=request.biases(), logprobs=wanted,
        top_logprobs=request.logprobs or 0,
    )  # fmt: skip


def text_completion(
    choices: Choices, model: str, call_id: str, logprobs: bool = False
) -> dict[str, Any]:
    """A `text_completion` object from each choice's whole Generate stream."""
    return {
        "id": call_id, "object": "text_completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": index, "text": "".join(c.text for c in chunks),
                     "logprobs": text_logprobs(chunks) if logprobs else None,
                     "finish_reason": FINISH.get(chunks[-1].finish_reason, "stop")}
                    for index, chunks in enumerate(choices)],
        "usage": usage(*(chunks[-1].usage for chunks in choices)),
    }  # fmt: skip


def text_logprobs(chunks: list[pb.GenerateChunk], offset: int = 0) -> dict[str, Any]:
    """The legacy completions' `logprobs`: the tokens, their log-probabilities, the
    likeliest tokens at each position as a map, and where each token begins in the text
    (counted from `offset`)."""
    items = [item for chunk in chunks for item in chunk.logprobs]
    starts = []
    for item in items:
        starts.append(offset)
        offset += len(item.token.token)
    return {
        "tokens": [item.token.token for item in items],
        "token_logprobs": [item.token.logprob for item in items],
        "top_logprobs": [{t.token: t.logprob for t in item.top_logprobs} for item in items],
        "text_offset": starts,
    }


def text_stream_events(
    pieces: Streamed, model: str, call_id: str, include_usage: bool, logprobs: bool = False,
    n: int = 1,
) -> Iterator[dict[str, Any]]:  # fmt: skip
    """`text_completion` objects as OpenAI streams them: each piece of text of each choice
    (with its tokens' log-probabilities when asked for), each choice's finish reason and, when
    asked for, the usage of all on a last object with no choices."""
    created = int(time.time())
    sent = [0] * n  # characters streamed of each choice: where its next piece's tokens begin

    def piece(index: int, text: str, finish: str | None,
              shown: pb.GenerateChunk | None = None) -> dict[str, Any]:  # fmt: skip
        listed = text_logprobs([shown], sent[index]) if logprobs and shown else None
        return {"id": call_id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": index, "text": text, "logprobs": listed,
                             "finish_reason": finish}]}  # fmt: skip

    finals = []
    for index, chunk in pieces:
        if chunk.text:
            yield piece(index, chunk.text, None, chunk)
            sent[index] += len(chunk.text)
        if chunk.finish_reason:
            yield piece(index, "", FINISH.get(chunk.finish_reason, "stop"))
            finals.append(chunk.usage)
    if include_usage and finals:
        yield {**piece(0, "", None), "choices": [], "usage": usage(*finals)}
