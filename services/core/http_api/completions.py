"""OpenAI's text completions API (`/v1/completions`, as llama.cpp's server serves it) as
Generate calls with a prompt: the text continued as it is, with no chat template. Pure
functions; errors and usage as in the chat API."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from pydantic import Field

from services.core.api import pb
from services.core.http_api.chat import FINISH, BadRequest, Sampled, refuse_unserved, usage


class CompletionRequest(Sampled):
    prompt: str | list[str]
    best_of: int = Field(1, ge=1, le=1)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


def completion_call(request: CompletionRequest) -> pb.GenerateRequest:
    """The Generate call a text completion request asks for."""
    refuse_unserved(request, {"echo": "echoing the prompt is not served; the client has it",
                              "logprobs": "log probabilities are not served",
                              "suffix": "fill-in-the-middle is not served"})  # fmt: skip
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    if len(prompts) != 1:
        raise BadRequest("prompt", f"{len(prompts)} prompts; send one per request")
    if not prompts[0]:
        raise BadRequest("prompt", "must not be empty")
    return pb.GenerateRequest(
        prompt=prompts[0], options=request.sampling(request.max_tokens), stop=request.stops()
    )


def text_completion(chunks: list[pb.GenerateChunk], model: str, call_id: str) -> dict[str, Any]:
    """A `text_completion` object from a whole Generate stream."""
    last = chunks[-1]
    return {
        "id": call_id, "object": "text_completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": "".join(c.text for c in chunks), "logprobs": None,
                     "finish_reason": FINISH.get(last.finish_reason, "stop")}],
        "usage": usage(last.usage),
    }  # fmt: skip


def text_stream_events(
    chunks: Iterator[pb.GenerateChunk], model: str, call_id: str, include_usage: bool
) -> Iterator[dict[str, Any]]:
    """`text_completion` objects as OpenAI streams them: each piece of text, the finish reason
    and, when asked for, the usage on a last object with no choices."""
    created = int(time.time())

    def piece(text: str, finish: str | None) -> dict[str, Any]:
        return {"id": call_id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": finish}]}  # fmt: skip

    for chunk in chunks:
        if chunk.text:
            yield piece(chunk.text, None)
        if chunk.finish_reason:
            yield piece("", FINISH.get(chunk.finish_reason, "stop"))
            if include_usage:
                yield {**piece("", None), "choices": [], "usage": usage(chunk.usage)}
