"""OpenAI's chat completions API as Generate calls: the request checked and translated, the
answer (whole or as server-sent events) and errors in OpenAI's shapes. Pure functions."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal, TypeVar

import grpc
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, ValidationError

from services.core.api import pb
from services.core.http_api.choices import CHOICES_LIMIT
from services.core.sampling import TOP_LOGPROBS_LIMIT

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error"),
}
FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop",
    pb.FINISH_REASON_LENGTH: "length",
}


class BadRequest(Exception):
    """A request body the API cannot take: HTTP 400 naming the parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


# -- the request, as OpenAI's chat completions API defines it (unknown keys are ignored) -------


class Body(BaseModel):
    """A request body: keys the API does not know are ignored, as OpenAI's and Ollama's do."""

    model_config = ConfigDict(extra="ignore")


BodyT = TypeVar("BodyT", bound=BaseModel)


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class JsonSchemaFormat(Body):
    schema_: dict[str, Any] = Field(alias="schema")


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(Body):
    include_usage: bool = False


# OpenAI's {"token id": bias}, or llama.cpp's [[token id, bias], ...]
LogitBias = dict[str, StrictFloat] | list[tuple[int, StrictFloat]] | None


class Sampled(Body):
    """What OpenAI's chat and text completions take alike: the model, limits, sampling, stops
    and streaming."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=CHOICES_LIMIT)  # each choice is a Generate call
    stream: bool = False
    stream_options: StreamOptions | None = None
    # llama.cpp's server takes these too.
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    grammar: str = ""  # GBNF
    logit_bias: LogitBias = None

    def sampling(self, max_tokens: int | None) -> pb.SamplingOptions:
        return pb.SamplingOptions(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            seed=self.seed, top_k=self.top_k, min_p=self.min_p,
            repeat_penalty=self.repeat_penalty, frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
        )  # fmt: skip

    def biases(self) -> dict[int, float]:
        return token_biases(self.logit_bias)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else self.stop or []


class ChatCompletionRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_LIMIT)


def parse_request(raw: bytes) -> ChatCompletionRequest:
    return parse_body(ChatCompletionRequest, raw)


def parse_body(kind: type[BodyT], raw: bytes) -> BodyT:
    """The body checked, or BadRequest naming the first parameter that is wrong."""
    try:
        return kind.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or "body"
        raise BadRequest(param, first["msg"]) from None


def generate_request(request: ChatCompletionRequest) -> pb.GenerateRequest:
    """The Generate call a chat completion request asks for."""
    if request.tools:
        raise BadRequest("tools", "tool calls are not served; describe the tools in a message")
    messages = chat_messages(request.messages)
    options = request.sampling(request.max_completion_tokens or request.max_tokens)
    if request.top_logprobs is not None and not request.logprobs:
        raise BadRequest("top_logprobs", "needs logprobs set to true")
    return pb.GenerateRequest(
        messages=messages, options=options, stop=request.stops(), json_schema=_schema(request),
        grammar=request.grammar, logit_bias=request.biases(), logprobs=request.logprobs,
        top_logprobs=request.top_logprobs or 0,
    )  # fmt: skip


def chat_messages(messages: list[Message]) -> list[pb.ChatMessage]:
    """OpenAI's messages as the runtime's: a developer message is a system one, text parts
    joined."""
    return [pb.ChatMessage(role="system" if m.role == "developer" else m.role,
                           content=text_of(m.content)) for m in messages]  # fmt: skip


def token_biases(given: LogitBias) -> dict[int, float]:
    """A `logit_bias` as OpenAI (`{"id": bias}`) or llama.cpp (`[[id, bias], ...]`) gives it."""
    pairs = given.items() if isinstance(given, dict) else given or []
    biases = {}
    for token, bias in pairs:
        if not str(token).isdigit():
            raise BadRequest("logit_bias", f"{token!r} is not a token id (see /tokenize)")
        biases[int(token)] = bias
    return biases


def refuse_unserved(request: BaseModel, unserved: dict[str, str]) -> None:
    """BadRequest naming the first parameter set that is not served, with why."""
    for param, why in unserved.items():
        if getattr(request, param):
            raise BadRequest(param, why)


def text_of(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def _schema(request: ChatCompletionRequest) -> str:
    wanted = request.response_format
    if wanted is None or wanted.type == "text":
        return ""
    if wanted.type == "json_object":
        return json.dumps({"type": "object"})
    if wanted.json_schema is None:
        raise BadRequest("response_format.json_schema", "json_schema needs its schema")
    return json.dumps(wanted.json_schema.schema_)


# -- the answer ------------------------------------------------------------------------------


# Each choice's whole Generate stream, in choice order.
Choices = list[list[pb.GenerateChunk]]


def completion(
    choices: Choices, model: str, call_id: str, logprobs: bool = False
) -> dict[str, Any]:
    """A `chat.completion` object from each choice's whole Generate stream."""
    return {
        "id": call_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": index,
            "message": {"role": "assistant", "content": "".join(c.text for c in chunks)},
            "logprobs": chat_logprobs(chunks) if logprobs else None,
            "finish_reason": FINISH.get(chunks[-1].finish_reason, "stop"),
        } for index, chunks in enumerate(choices)],
        "usage": usage(*(chunks[-1].usage for chunks in choices)),
    }  # fmt: skip


def chat_logprobs(chunks: Iterable[pb.GenerateChunk]) -> dict[str, Any]:
    """OpenAI's `choices[].logprobs` of a chat completion: each token, its log-probability,
    its bytes and the likeliest tokens at its position."""

    def entry(token: pb.TokenLogprob) -> dict[str, Any]:
        return {"token": token.token, "logprob": token.logprob, "bytes": list(token.bytes)}

    content = [{**entry(item.token), "top_logprobs": [entry(t) for t in item.top_logprobs]}
               for chunk in chunks for item in chunk.logprobs]  # fmt: skip
    return {"content": content, "refusal": None}


def usage(*counted: pb.Usage) -> dict[str, Any]:
    """OpenAI's usage of one or more choices: the prompt counted once, as OpenAI counts it,
    and every choice's completion."""
    prompt, completed = counted[0].prompt_tokens, sum(c.completion_tokens for c in counted)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completed,
        "total_tokens": prompt + completed,
        "prompt_tokens_details": {"cached_tokens": counted[0].cached_prompt_tokens},
    }


# Each choice's chunks as they arrive, as (choice index, chunk).
Streamed = Iterator[tuple[int, pb.GenerateChunk]]


def stream_events(
    pieces: Streamed, model: str, call_id: str, include_usage: bool, logprobs: bool = False,
    n: int = 1,
) -> Iterator[dict[str, Any]]:  # fmt: skip
    """`chat.completion.chunk` objects: each choice's role, each piece of text (with its
    tokens' log-probabilities when asked for), each choice's finish reason and, when asked
    for, the usage of all on a last chunk with no choices."""
    created = int(time.time())

    def chunk(index: int, delta: dict[str, Any], finish: str | None,
              shown: pb.GenerateChunk | None = None) -> dict[str, Any]:  # fmt: skip
        choice = {"index": index, "delta": delta, "finish_reason": finish,
                  "logprobs": chat_logprobs([shown]) if logprobs and shown else None}  # fmt: skip
        return {"id": call_id, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [choice]}  # fmt: skip

    for index in range(n):
        yield chunk(index, {"role": "assistant", "content": ""}, None)
    finals = []
    for index, piece in pieces:
        if piece.text:
            yield chunk(index, {"content": piece.text}, None, piece)
        if piece.finish_reason:
            yield chunk(index, {}, FINISH.get(piece.finish_reason, "stop"))
            finals.append(piece.usage)
    if include_usage and finals:
        yield {**chunk(0, {}, None), "choices": [], "usage": usage(*finals)}


def error_body(status: int, kind: str, message: str, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def http_status(code: grpc.StatusCode) -> tuple[int, str]:
    return _STATUS.get(code, (500, "server_error"))


# The servers' INVALID_ARGUMENT messages start with the field: `inputs['x']: …`, `options.top_p: …`
_FIELD_FIRST = re.compile(r"([A-Za-z_][\w.]*(?:\[[^\]]*\])*(?:\.\w+)*): ")


def rpc_param(code: grpc.StatusCode, details: str) -> str | None:
    """The request field an RPC error names, for OpenAI's `param`."""
    found = _FIELD_FIRST.match(details) if code == grpc.StatusCode.INVALID_ARGUMENT else None
    return found.group(1) if found else None
