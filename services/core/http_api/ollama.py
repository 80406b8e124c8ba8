"""Ollama's own API (`/api/chat`, `/api/generate`, `/api/tags`, `/api/show`, `/api/ps`,
`/api/version`) as Generate and GetModelInfo calls, so the `ollama` package and LiteLLM's
`ollama_chat/` talk to an edge runtime unchanged. Pure functions: requests checked and
translated, answers (whole or as NDJSON lines) in Ollama's shapes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import Field

from services.core.api import pb
from services.core.http_api.chat import BadRequest, Body, chat_logprobs, refuse_unserved
from services.core.sampling import TOP_LOGPROBS_LIMIT

VERSION = "0.12.0"  # the Ollama API version whose shapes these are
_DONE = {pb.FINISH_REASON_LENGTH: "length"}  # anything else ended as a stop


class Options(Body):
    """The runtime options Ollama's `options` may carry that a Generate call serves; others
    (num_ctx, num_thread, mirostat…) are set when the runtime starts, and ignored here."""

    num_predict: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, lt=2**32)
    stop: list[str] = Field(default_factory=list)
    repeat_penalty: float | None = Field(None, gt=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)


class Message(Body):
    role: Literal["system", "user", "assistant"]
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None


class _Call(Body):
    model: str = Field(min_length=1)
    stream: bool = True  # Ollama streams unless told not to
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options = Options()
    think: bool | str | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_LIMIT)


class ChatRequest(_Call):
    messages: list[Message] = Field(default_factory=list)
    tools: list[Any] | None = None


class GenerateRequest(_Call):
    prompt: str = ""
    system: str = ""
    suffix: str = ""
    template: str = ""
    raw: bool = False
    context: list[int] | None = None
    images: list[Any] | None = None


def served_names(model_name: str) -> tuple[str, ...]:
    """The names a call may give the served model: first as Ollama lists it (lowercase, no
    spaces, `:latest` when untagged), then without the tag, then as the runtime names it."""
    slug = re.sub(r"[^a-z0-9._:/-]+", "-", model_name.lower()).strip("-") or "model"
    listed = slug if ":" in slug else f"{slug}:latest"
    return tuple(dict.fromkeys((listed, listed.removesuffix(":latest"), model_name)))


def check_model(asked: str, model_name: str) -> None:
    """Ollama answers an unknown model with 404; so does this server, naming the one it has."""
    if asked not in served_names(model_name):
        raise ModelNotFound(f"model '{asked}' not found; this server serves "
                            f"'{served_names(model_name)[0]}'")  # fmt: skip


class ModelNotFound(Exception):
    """HTTP 404, as Ollama answers a model it does not have."""


# The server's INVALID_ARGUMENT names its own fields; an Ollama caller sent these.
_OLLAMA_FIELDS = {"options.max_tokens": "options.num_predict", "stop": "options.stop",
                  "json_schema": "format"}  # fmt: skip


def in_ollama_terms(message: str) -> str:
    """A server error message, its leading field named as the Ollama request named it."""
    for served, asked in _OLLAMA_FIELDS.items():
        if message.startswith((f"{served}:", f"{served}[")):
            return asked + message.removeprefix(served)
    return message


# -- requests ---------------------------------------------------------------------------------


def chat_call(request: ChatRequest) -> pb.GenerateRequest | None:
    """The Generate call `/api/chat` asks for; None for no messages (Ollama's "load")."""
    _refuse(request)
    if request.tools:
        raise BadRequest("tools", "tool calls are not served; describe the tools in a message")
    for index, message in enumerate(request.messages):
        if message.images:
            raise BadRequest(f"messages.{index}.images", "images are not served (a text model)")
        if message.tool_calls:
            raise BadRequest(f"messages.{index}.tool_calls", "tool calls are not served")
    if not request.messages:
        return None
    messages = [pb.ChatMessage(role=m.role, content=m.content) for m in request.messages]
    return _generate(request, messages)


def generate_call(request: GenerateRequest) -> pb.GenerateRequest | None:
    """The Generate call `/api/generate` asks for: the prompt as the user's message after the
    system's, in the model's chat template, or with `raw` the prompt continued as it is (the
    system then ignored, as Ollama does); None for an empty prompt (Ollama's "load")."""
    _refuse(request)
    refuse_unserved(request, {
        "suffix": "fill-in-the-middle is not served",
        "template": "the template is the bundle's; send the text as the prompt, or with raw: true",
        "context": "token contexts are not kept; send the conversation to /api/chat",
        "images": "images are not served (a text model)",
    })  # fmt: skip
    if not request.prompt:
        return None
    if request.raw:
        return _generate(request, prompt=request.prompt)
    messages = [pb.ChatMessage(role="user", content=request.prompt)]
    if request.system:
        messages.insert(0, pb.ChatMessage(role="system", content=request.system))
    return _generate(request, messages)


def _refuse(request: _Call) -> None:
    if request.think:
        raise BadRequest("think", f"'{request.model}' does not support thinking")
    if request.top_logprobs and not request.logprobs:
        raise BadRequest("top_logprobs", "needs logprobs set to true")


def _generate(
    request: _Call, messages: list[pb.ChatMessage] | None = None, prompt: str = ""
) -> pb.GenerateRequest:
    given = request.options
    if given.num_predict == 0:
        raise BadRequest("options.num_predict", "must be positive (negative: the server's limit)")
    options = pb.SamplingOptions(
        max_tokens=given.num_predict if given.num_predict and given.num_predict > 0 else None,
        temperature=given.temperature,
        top_p=given.top_p,
        seed=given.seed if given.seed is None or given.seed >= 0 else None,  # -1: random
        top_k=given.top_k,
        min_p=given.min_p,
        repeat_penalty=given.repeat_penalty,
        frequency_penalty=given.frequency_penalty,
        presence_penalty=given.presence_penalty,
    )
    return pb.GenerateRequest(
        messages=messages, prompt=prompt, options=options, stop=given.stop,
        json_schema=_schema(request.format), logprobs=request.logprobs,
        top_logprobs=request.top_logprobs or 0,
    )  # fmt: skip


def _schema(wanted: str | dict[str, Any] | None) -> str:
    if not wanted:
        return ""
    return json.dumps({"type": "object"} if wanted == "json" else wanted)


# -- answers ----------------------------------------------------------------------------------


def answer_lines(
    chunks: Iterator[pb.GenerateChunk], model: str, chat: bool, logprobs: bool = False
) -> Iterator[dict[str, Any]]:
    """The streamed answer: an object per piece of text (and its tokens' log-probabilities
    when asked for), then the last with `done` and counts."""
    for piece in chunks:
        if piece.text or not piece.finish_reason:
            line = _line(model, chat, piece.text, done=False)
            yield {**line, "logprobs": token_logprobs([piece])} if logprobs else line
        if piece.finish_reason:
            yield {**_line(model, chat, "", done=True), **_counts(piece)}


def whole_answer(
    chunks: list[pb.GenerateChunk], model: str, chat: bool, logprobs: bool = False
) -> dict[str, Any]:
    """The answer with `"stream": false`: one object with all the text and the counts."""
    text = "".join(piece.text for piece in chunks)
    answer = {**_line(model, chat, text, done=True), **_counts(chunks[-1])}
    return {**answer, "logprobs": token_logprobs(chunks)} if logprobs else answer


def token_logprobs(chunks: list[pb.GenerateChunk]) -> list[dict[str, Any]]:
    """Ollama's `logprobs`: OpenAI's entries (each token, its log-probability and bytes, and
    the likeliest tokens at its position), as a list."""
    listed: list[dict[str, Any]] = chat_logprobs(chunks)["content"]
    return listed


def loaded(model: str, chat: bool) -> dict[str, Any]:
    """Ollama's answer to a call with nothing to say: the model is loaded (it always is)."""
    return {**_line(model, chat, "", done=True), "done_reason": "load"}


def _line(model: str, chat: bool, text: str, done: bool) -> dict[str, Any]:
    said = {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
    return {"model": model, "created_at": _now(), **said, "done": done}


def _counts(last: pb.GenerateChunk) -> dict[str, Any]:
    # Ollama's durations are nanoseconds; the server's timings are milliseconds.
    prompt_ns = int(last.time_to_first_token_ms * 1e6)
    total_ns = int(last.latency_ms * 1e6)
    return {
        "done_reason": _DONE.get(last.finish_reason, "stop"),
        "total_duration": total_ns,
        "load_duration": 0,  # the model is loaded when the runtime starts
        "prompt_eval_count": last.usage.prompt_tokens,
        "prompt_eval_duration": prompt_ns,
        "eval_count": last.usage.completion_tokens,
        "eval_duration": max(total_ns - prompt_ns, 0),
    }


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


# -- the model --------------------------------------------------------------------------------


def details(info: pb.ModelInfo) -> dict[str, Any]:
    return {"parent_model": "", "format": "gguf", "family": "", "families": None,
            "parameter_size": "", "quantization_level": info.quantization}  # fmt: skip


def tags(info: pb.ModelInfo) -> dict[str, Any]:
    """`/api/tags`: the one model this server serves."""
    name = served_names(info.model_name)[0]
    listed = {"name": name, "model": name, "modified_at": _now(),
              "digest": info.gguf_sha256, "details": details(info)}  # fmt: skip
    return {"models": [listed]}


def running(info: pb.ModelInfo) -> dict[str, Any]:
    """`/api/ps`: the model, loaded for as long as the runtime runs."""
    name = served_names(info.model_name)[0]
    listed = {"name": name, "model": name, "digest": info.gguf_sha256, "details": details(info),
              "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0,
              "context_length": info.context_length}  # fmt: skip
    return {"models": [listed]}


def shown(info: pb.ModelInfo) -> dict[str, Any]:
    """`/api/show`: what the server knows of the model (no Modelfile: it runs a bundle's GGUF)."""
    known = {
        "general.context_length": info.trained_context_length,
        "edgedistill.context_length": info.context_length,
        "edgedistill.bundle_version": info.bundle_version,
        "edgedistill.backend": info.backend,
        "general.embedding_length": info.embedding_length,
    }
    return {"modelfile": "", "parameters": "", "template": "", "details": details(info),
            "model_info": known, "capabilities": ["completion"], "modified_at": _now()}  # fmt: skip
