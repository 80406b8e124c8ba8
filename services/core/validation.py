"""Checks on what clients send. Each failure names the field and how to fix it."""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from services.core.api import pb
from services.core.program import FieldSpec, input_text
from services.core.sampling import SAMPLING_DEFAULTS as DEFAULT
from services.core.sampling import TOP_LOGPROBS_LIMIT, GenerationParams

ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 256
EMBED_INPUTS_LIMIT = 2048  # texts per Embed call, as OpenAI's embeddings API takes


class RpcFailure(Exception):
    """Ends a call with a gRPC status; raised by handlers, turned into abort() at the edge."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(field: str, message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}")


@dataclass(frozen=True)
class Limits:
    max_tokens_default: int
    max_tokens_limit: int
    max_request_bytes: int
    context_length: int


# A chat or a text, as Generate and Tokenize take them.
Prompted = pb.GenerateRequest | pb.TokenizeRequest


def check_size(request: pb.PredictRequest | pb.EmbedRequest | Prompted, limit: int) -> None:
    size = request.ByteSize()
    if size <= limit:
        return
    sizes = _text_sizes(request)  # name the field that makes it big: the client shortens it
    largest = max(sizes, key=lambda name: sizes[name]) if sizes else "request"
    raise invalid(
        largest,
        f"the request is {size} bytes, over the server's max_request_bytes={limit}; send less text",
    )


def _text_sizes(request: pb.PredictRequest | pb.EmbedRequest | Prompted) -> dict[str, int]:
    if isinstance(request, pb.PredictRequest):
        sizes = {f"inputs[{key[:40]!r}]": len(value.encode())
                 for key, value in request.inputs.items()}  # fmt: skip
        return {**sizes, "inputs_json": len(request.inputs_json.encode())}
    if isinstance(request, pb.EmbedRequest):
        return {f"inputs[{index}]": len(text.encode()) for index, text in enumerate(request.inputs)}
    sizes = {f"messages[{index}].content": len(message.content.encode())
             for index, message in enumerate(request.messages)}  # fmt: skip
    texts = ("prompt", "json_schema", "grammar")
    for name in texts if isinstance(request, pb.GenerateRequest) else texts[:1]:
        sizes[name] = len(getattr(request, name).encode())
    return sizes


def embed_inputs(request: pb.EmbedRequest) -> list[str]:
    """The texts to embed: one at least, at most EMBED_INPUTS_LIMIT, none empty."""
    if not request.inputs:
        raise invalid("inputs", "give at least one text to embed")
    if len(request.inputs) > EMBED_INPUTS_LIMIT:
        raise invalid("inputs", f"{len(request.inputs)} texts; send at most "
                      f"{EMBED_INPUTS_LIMIT} per call")  # fmt: skip
    for index, text in enumerate(request.inputs):
        if not text.strip():
            raise invalid(f"inputs[{index}]", "is empty; give text to embed")
    return list(request.inputs)


def sampling_params(
    options: pb.SamplingOptions,
    limits: Limits,
    *,
    default_temperature: float,
    stop: tuple[str, ...] = (),
    json_schema: str | None = None,
    grammar: str | None = None,
    logit_bias: tuple[tuple[int, float], ...] = (),
    logprobs: bool = False,
    top_logprobs: int = 0,
) -> GenerationParams:
    max_tokens = limits.max_tokens_default
    if options.HasField("max_tokens"):
        max_tokens = options.max_tokens
        if not 1 <= max_tokens <= limits.max_tokens_limit:
            raise invalid(
                "options.max_tokens",
                f"{max_tokens} is out of range; use 1..{limits.max_tokens_limit}",
            )
    seed = options.seed if options.HasField("seed") else secrets.randbelow(2**31)
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=_bounded(
            options, "temperature", default_temperature, lambda v: 0.0 <= v <= 2.0, "0..2"
        ),
        top_p=_bounded(options, "top_p", DEFAULT.top_p, lambda v: 0.0 < v <= 1.0, "(0, 1]"),
        seed=seed,
        top_k=options.top_k if options.HasField("top_k") else DEFAULT.top_k,
        min_p=_bounded(options, "min_p", DEFAULT.min_p, lambda v: 0.0 <= v <= 1.0, "0..1"),
        repeat_penalty=_bounded(
            options, "repeat_penalty", DEFAULT.repeat_penalty, lambda v: 0.0 < v <= 2.0, "(0, 2]"
        ),
        frequency_penalty=_bounded(
            options, "frequency_penalty", DEFAULT.frequency_penalty, _penalty, "-2..2"
        ),
        presence_penalty=_bounded(
            options, "presence_penalty", DEFAULT.presence_penalty, _penalty, "-2..2"
        ),
        stop=stop,
        json_schema=json_schema,
        grammar=grammar,
        logit_bias=logit_bias,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def logprob_request(request: pb.GenerateRequest) -> dict[str, Any]:
    """Generate's `logprobs` and `top_logprobs` as GenerationParams takes them."""
    top = request.top_logprobs
    if top and not request.logprobs:
        raise invalid("top_logprobs", "needs logprobs set to true")
    if top > TOP_LOGPROBS_LIMIT:
        raise invalid("top_logprobs", f"{top} is out of range; use 0..{TOP_LOGPROBS_LIMIT}")
    return {"logprobs": request.logprobs, "top_logprobs": top}


def json_schema_object(schema: str) -> dict[str, Any]:
    """A JSON Schema's text as its object; ValueError saying why it is not one."""
    try:
        parsed = json.loads(schema)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at position {err.pos})") from err
    if not isinstance(parsed, dict):
        raise ValueError("a JSON Schema must be a JSON object")
    return parsed


def output_constraint(request: pb.GenerateRequest) -> tuple[str | None, str | None]:
    """Generate's `json_schema` and `grammar`, at most one of them set."""
    if request.json_schema and request.grammar:
        raise invalid("grammar", "give a grammar or a json_schema, not both")
    return request.json_schema or None, request.grammar or None


def _penalty(value: float) -> bool:
    return -2.0 <= value <= 2.0


def _bounded(
    options: pb.SamplingOptions, name: str, default: float, fits: Callable[[float], bool], span: str
) -> float:
    """An optional float option: its default when unset, INVALID_ARGUMENT outside `span`."""
    if not options.HasField(name):
        return default
    value: float = getattr(options, name)
    if not (math.isfinite(value) and fits(value)):
        raise invalid(f"options.{name}", f"{value:g} is out of range; use {span}")
    return value


def predict_inputs(request: pb.PredictRequest, fields: Sequence[FieldSpec]) -> dict[str, str]:
    """The request's inputs: each one the program takes, every required one given, each a
    value of its field's type."""
    expected = [f.name for f in fields]
    given = {**dict(request.inputs), **_json_inputs(request, fields)}
    unknown = sorted(set(given) - set(expected))
    if unknown:
        raise invalid(
            f"inputs[{unknown[0][:40]!r}]",
            f"unknown input field; the program takes {', '.join(expected)}",
        )
    missing = [f.name for f in fields if f.required and f.name not in given]
    if missing:
        raise invalid(
            f"inputs[{missing[0]!r}]", f"missing; the program takes {', '.join(expected)}"
        )
    for name, value in given.items():
        if "\x00" in value:
            raise invalid(f"inputs[{name!r}]", "contains a NUL character")
    for field in fields:
        problem = field.input_error(given[field.name]) if field.name in given else None
        if problem:
            raise invalid(f"inputs[{field.name!r}]", problem)
    return given


def _json_inputs(request: pb.PredictRequest, fields: Sequence[FieldSpec]) -> dict[str, str]:
    """`inputs_json`'s values as `inputs` carries them (a value's text, else its JSON), with a
    JSON `null` refused where the field is text (it would otherwise reach the model as "null")."""
    if not request.inputs_json:
        return {}
    try:
        values = json.loads(request.inputs_json)
    except ValueError as err:
        raise invalid("inputs_json", f"not JSON ({err})") from None
    if not isinstance(values, dict):
        raise invalid("inputs_json", 'send a JSON object: {"<input field>": <value>, ...}')
    text_fields = {f.name for f in fields if f.is_text}
    for name, value in values.items():
        if name in request.inputs:
            raise invalid(f"inputs[{name[:40]!r}]", "in both inputs and inputs_json; send it once")
        if value is None and name in text_fields:
            raise invalid(f"inputs[{name!r}]", "null is not a str; send text, or leave out an "
                          "input that has a default")  # fmt: skip
    return {name: input_text(value) for name, value in values.items()}


def raw_prompt(request: Prompted) -> str | None:
    """The text to continue as is (a text completion), or None for a chat."""
    if not request.prompt:
        return None
    if request.messages:
        raise invalid("prompt", "give messages (a chat) or a prompt (a text completion), not both")
    if "\x00" in request.prompt:
        raise invalid("prompt", "contains a NUL character")
    return request.prompt


def chat_messages(request: Prompted) -> list[dict[str, str]]:
    if not request.messages:
        raise invalid("messages", "at least one message is required (or a prompt to continue)")
    messages = []
    for index, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise invalid(
                f"messages[{index}].role",
                f"unknown role {message.role[:40]!r}; use one of {', '.join(ROLES)}",
            )
        if "\x00" in message.content:
            raise invalid(f"messages[{index}].content", "contains a NUL character")
        messages.append({"role": message.role, "content": message.content})
    return messages


def stop_strings(request: pb.GenerateRequest) -> tuple[str, ...]:
    if len(request.stop) > MAX_STOP_STRINGS:
        raise invalid("stop", f"{len(request.stop)} stop strings; at most {MAX_STOP_STRINGS}")
    for index, stop in enumerate(request.stop):
        if not stop or len(stop) > MAX_STOP_LENGTH:
            raise invalid(f"stop[{index}]", f"must be 1..{MAX_STOP_LENGTH} characters")
    return tuple(request.stop)


def longest_input(inputs: dict[str, str]) -> str:
    """The input a prompt over the context is named by: the longest, which the client shortens."""
    if not inputs:
        return "inputs"
    name = max(inputs, key=lambda key: len(inputs[key]))
    return f"inputs[{name!r}]"


def fits_context(
    prompt_tokens: int | None, max_tokens: int, context_length: int, field: str
) -> None:
    if prompt_tokens is None:
        return
    if prompt_tokens + max_tokens > context_length:
        raise invalid(
            field,
            f"the prompt is {prompt_tokens} tokens; with max_tokens={max_tokens} it needs "
            f"{prompt_tokens + max_tokens}, over the context of {context_length}; "
            "shorten the input or lower max_tokens",
        )
