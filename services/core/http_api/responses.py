"""OpenAI's Responses API (`POST /v1/responses`) as Generate calls, stateless as Ollama's and
llama.cpp's server's: the request checked and translated, the answer as a `response` object
or as its stream of typed events. Pure functions."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field

from services.core.api import pb
from services.core.http_api.chat import BadRequest, Body, chat_logprobs
from services.core.sampling import TOP_LOGPROBS_LIMIT

# The `include` entry that asks for each output token's log-probability.
LOGPROBS_INCLUDE = "message.output_text.logprobs"
_ROLES = ("system", "developer", "user", "assistant")
_TEXT_PARTS = ("input_text", "output_text", "text")
# What a stateless runtime without tools cannot take, with what to do instead.
_UNSERVED = {
    "previous_response_id": "responses are not stored; send the whole conversation in input",
    "conversation": "conversations are not stored; send the whole conversation in input",
    "tools": "tool calls are not served; describe the tools in the instructions",
}


class TextFormat(Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    name: str | None = None


class TextOptions(Body):
    format: TextFormat = TextFormat()


class ResponsesBody(Body):
    """`POST /v1/responses`'s request (keys it does not serve, `store` and `reasoning` among
    them, are ignored, as Ollama ignores them)."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_LIMIT)
    include: list[str] = Field(default_factory=list)
    text: TextOptions = TextOptions()
    stream: bool = False
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    tools: list[Any] | None = None


def responses_call(body: ResponsesBody) -> pb.GenerateRequest:
    """The Generate call a Responses request asks for: `instructions` as the system message,
    then `input` (a text is one user message)."""
    for param, why in _UNSERVED.items():
        if getattr(body, param):
            raise BadRequest(param, why)
    system = [pb.ChatMessage(role="system", content=body.instructions)] if body.instructions else []
    logprobs = LOGPROBS_INCLUDE in body.include
    if body.top_logprobs and not logprobs:
        raise BadRequest("top_logprobs", f'needs include: ["{LOGPROBS_INCLUDE}"]')
    options = pb.SamplingOptions(max_tokens=body.max_output_tokens,
                                 temperature=body.temperature, top_p=body.top_p)  # fmt: skip
    return pb.GenerateRequest(
        messages=system + input_messages(body.input), options=options,
        json_schema=_schema(body.text.format), logprobs=logprobs,
        top_logprobs=body.top_logprobs or 0,
    )  # fmt: skip


def input_messages(given: str | list[dict[str, Any]]) -> list[pb.ChatMessage]:
    """`input` as chat messages: a text, or message items whose content is text or text
    parts; anything else is refused naming its place (`input[2].content[0]`)."""
    if isinstance(given, str):
        return [pb.ChatMessage(role="user", content=given)]
    if not given:
        raise BadRequest("input", "give a text or at least one message")
    return [_message(item, f"input[{index}]") for index, item in enumerate(given)]


def _message(item: dict[str, Any], where: str) -> pb.ChatMessage:
    kind = item.get("type", "message")
    if kind != "message":
        raise BadRequest(where, f"{kind!r} items are not served; send messages with text")
    role = item.get("role")
    if role not in _ROLES:
        raise BadRequest(f"{where}.role", f"{role!r} is not one of {', '.join(_ROLES)}")
    content = item.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = "".join(_part_text(part, f"{where}.content[{i}]") for i, part in enumerate(content))
    else:
        raise BadRequest(f"{where}.content", "give a text or a list of text parts")
    return pb.ChatMessage(role="system" if role == "developer" else role, content=text)


def _part_text(part: Any, where: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
        raise BadRequest(where, f"{kind!r} parts are not served; only text ({_TEXT_PARTS[0]})")
    return str(part["text"])


def _schema(wanted: TextFormat) -> str:
    if wanted.type == "text":
        return ""
    if wanted.type == "json_object":
        return json.dumps({"type": "object"})
    if wanted.schema_ is None:
        raise BadRequest("text.format.schema", "a json_schema format needs its schema")
    return json.dumps(wanted.schema_)


# -- the answer ------------------------------------------------------------------------------


class Ids:
    """The response's and its message's ids, and when it was made."""

    def __init__(self, response_id: str, message_id: str) -> None:
        self.response = response_id
        self.message = message_id
        self.created = int(time.time())


def response_object(
    chunks: list[pb.GenerateChunk] | None, body: ResponsesBody, model: str, ids: Ids
) -> dict[str, Any]:
    """A `response` object: complete from the whole Generate stream, or (None) as it starts,
    in progress and without output."""
    status = "in_progress" if chunks is None else _status(chunks[-1])
    return {
        "id": ids.response, "object": "response", "created_at": ids.created, "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "model": model,
        "output": [] if chunks is None else [_message_item(chunks, body, ids)],
        "parallel_tool_calls": False, "previous_response_id": None, "store": False,
        "temperature": body.temperature, "top_p": body.top_p, "tool_choice": "none",
        "tools": [], "text": {"format": body.text.format.model_dump(by_alias=True,
                                                                    exclude_none=True)},
        "truncation": "disabled", "metadata": {},
        "usage": None if chunks is None else _usage(chunks[-1].usage),
    }  # fmt: skip


def _status(last: pb.GenerateChunk) -> str:
    return "incomplete" if last.finish_reason == pb.FINISH_REASON_LENGTH else "completed"


def _message_item(chunks: list[pb.GenerateChunk], body: ResponsesBody, ids: Ids
                  ) -> dict[str, Any]:  # fmt: skip
    return {"type": "message", "id": ids.message, "status": _status(chunks[-1]),
            "role": "assistant", "content": [_text_part(chunks, body)]}  # fmt: skip


def _text_part(chunks: list[pb.GenerateChunk], body: ResponsesBody) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "output_text", "text": "".join(c.text for c in chunks),
                            "annotations": []}  # fmt: skip
    if LOGPROBS_INCLUDE in body.include:
        part["logprobs"] = chat_logprobs(chunks)["content"]
    return part


def _usage(counted: pb.Usage) -> dict[str, Any]:
    return {
        "input_tokens": counted.prompt_tokens,
        "input_tokens_details": {"cached_tokens": counted.cached_prompt_tokens},
        "output_tokens": counted.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": counted.prompt_tokens + counted.completion_tokens,
    }


def response_events(
    pieces: Iterator[pb.GenerateChunk], body: ResponsesBody, model: str, ids: Ids
) -> Iterator[dict[str, Any]]:
    """The Responses stream: the response created, its message and text part opened, each
    piece of text as a delta, then everything done and the whole response, `completed` (or
    `incomplete`, cut by max_output_tokens); each event with its `sequence_number`."""
    for number, event in enumerate(_events(pieces, body, model, ids)):
        yield {**event, "sequence_number": number}


def _events(
    pieces: Iterator[pb.GenerateChunk], body: ResponsesBody, model: str, ids: Ids
) -> Iterator[dict[str, Any]]:
    where = {"item_id": ids.message, "output_index": 0}
    opened = {"type": "message", "id": ids.message, "status": "in_progress",
              "role": "assistant", "content": []}  # fmt: skip
    empty = {"type": "output_text", "text": "", "annotations": []}
    started = response_object(None, body, model, ids)
    yield {"type": "response.created", "response": started}
    yield {"type": "response.in_progress", "response": started}
    yield {"type": "response.output_item.added", "output_index": 0, "item": opened}
    yield {"type": "response.content_part.added", **where, "content_index": 0, "part": empty}
    chunks = []
    for piece in pieces:
        chunks.append(piece)
        if piece.text:
            delta = {"type": "response.output_text.delta", **where, "content_index": 0,
                     "delta": piece.text}  # fmt: skip
            if LOGPROBS_INCLUDE in body.include:
                delta["logprobs"] = chat_logprobs([piece])["content"]
            yield delta
    whole = response_object(chunks, body, model, ids)
    item = whole["output"][0]
    part = item["content"][0]
    yield {"type": "response.output_text.done", **where, "content_index": 0,
           "text": part["text"], "logprobs": part.get("logprobs", [])}  # fmt: skip
    yield {"type": "response.content_part.done", **where, "content_index": 0, "part": part}
    yield {"type": "response.output_item.done", "output_index": 0, "item": item}
    yield {"type": f"response.{whole['status']}", "response": whole}
