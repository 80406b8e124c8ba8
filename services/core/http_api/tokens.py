"""llama.cpp's server `/tokenize` and `/detokenize` as Tokenize and Detokenize calls. Pure
functions."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from services.core.api import pb
from services.core.http_api.chat import BadRequest, Body, Message, chat_messages


class TokenizeBody(Body):
    content: str | None = None
    # Not llama.cpp's: a chat, tokenized as a chat completion prompts the model with it.
    messages: list[Message] | None = None
    add_special: bool = False  # llama.cpp's default: the text's tokens alone
    with_pieces: bool = False


class DetokenizeBody(Body):
    tokens: list[int] = Field(default_factory=list)


def tokenize_call(body: TokenizeBody) -> pb.TokenizeRequest:
    """The Tokenize call: `content` as a text completion's prompt is tokenized (the
    beginning-of-text token only with `add_special`), or `messages` as a chat's."""
    if (body.content is None) == (body.messages is None):
        raise BadRequest("content", "give content (a text) or messages (a chat), one of them")
    if body.messages is not None:
        return pb.TokenizeRequest(messages=chat_messages(body.messages),
                                  with_pieces=body.with_pieces)  # fmt: skip
    return pb.TokenizeRequest(prompt=body.content, bare=not body.add_special,
                              with_pieces=body.with_pieces)  # fmt: skip


def tokenize_answer(reply: pb.TokenizeResponse) -> dict[str, Any]:
    """llama.cpp's answer: the ids, or with pieces each id and its text (its bytes when the
    text is not whole UTF-8), and the context length."""
    if not reply.pieces:
        return {"tokens": list(reply.tokens), "n_ctx": reply.context_length}
    listed = [{"id": token, "piece": _piece(piece.bytes)}
              for token, piece in zip(reply.tokens, reply.pieces, strict=True)]  # fmt: skip
    return {"tokens": listed, "n_ctx": reply.context_length}


def detokenize_call(body: DetokenizeBody) -> pb.DetokenizeRequest:
    for index, token in enumerate(body.tokens):
        if token < 0:
            raise BadRequest(f"tokens.{index}", f"{token} is not a token id")
    return pb.DetokenizeRequest(tokens=body.tokens)


def _piece(raw: bytes) -> str | list[int]:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)
