"""Embeddings over HTTP as Embed calls: OpenAI's `/v1/embeddings` (llama.cpp's server serves
it too) and Ollama's `/api/embed` and older `/api/embeddings`. Pure functions."""

from __future__ import annotations

import base64
import re
import struct
import time
from collections.abc import Callable
from typing import Any, Generic, Literal, NamedTuple, TypeVar

from pydantic import Field

from services.core.api import pb
from services.core.http_api.chat import BadRequest, Body

B = TypeVar("B", bound=Body)


class OpenAIBody(Body):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


class OllamaBody(Body):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(default_factory=list)
    truncate: bool = True  # Ollama cuts a long input to the context unless told not to
    dimensions: int | None = Field(None, ge=1)


class OllamaLegacyBody(Body):
    model: str = Field(min_length=1)
    prompt: str = ""


def openai_call(body: OpenAIBody) -> pb.EmbedRequest:
    """One text or a list (OpenAI's token arrays are not served: the texts are)."""
    given = [body.input] if isinstance(body.input, str) else body.input
    texts = [text for text in given if isinstance(text, str)]
    if len(texts) != len(given):
        raise BadRequest(
            "input",
            "token arrays are not served; send the text itself (with "
            "LangChain's OpenAIEmbeddings: check_embedding_ctx_length=False)",
        )
    return pb.EmbedRequest(inputs=texts)


def openai_answer(reply: pb.EmbedResponse, body: OpenAIBody, model: str) -> dict[str, Any]:
    check_dimensions(reply, body.dimensions)
    data = [{"object": "embedding", "index": index,
             "embedding": _encoded(list(item.values), body.encoding_format)}
            for index, item in enumerate(reply.embeddings)]  # fmt: skip
    read = reply.usage.prompt_tokens
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": read, "total_tokens": read}}  # fmt: skip


def check_dimensions(reply: pb.EmbedResponse, asked: int | None) -> None:
    """A `dimensions` other than the model's width is refused: cutting a vector short keeps
    its meaning only for models trained so (Matryoshka), which a served GGUF need not be."""
    width = len(reply.embeddings[0].values) if reply.embeddings else 0
    if asked not in (None, width):
        raise BadRequest("dimensions", f"this model's vectors have {width} dimensions; "
                         "leave dimensions out")  # fmt: skip


def in_openai_terms(message: str) -> str:
    """An Embed error naming `inputs[i]`, as OpenAI's and `/api/embed`'s requests name it
    (`input`)."""
    return re.sub(r"^inputs\b", "input", message)


def in_prompt_terms(message: str) -> str:
    """An Embed error naming `inputs[0]`, as `/api/embeddings` names its one text (`prompt`)."""
    return re.sub(r"^inputs\[0\]", "prompt", message)


# Each embedding route's field names, for the errors Embed gives in its own (`inputs[i]`).
IN_ROUTE_TERMS: dict[str, Callable[[str], str]] = {
    "/v1/embeddings": in_openai_terms, "/embeddings": in_openai_terms,
    "/api/embed": in_openai_terms, "/api/embeddings": in_prompt_terms,
}  # fmt: skip


def ollama_call(body: OllamaBody) -> pb.EmbedRequest | None:
    """None for no input (Ollama's way to load the model)."""
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not any(texts):
        return None
    return pb.EmbedRequest(inputs=texts, truncate=body.truncate)


def ollama_answer(reply: pb.EmbedResponse | None, body: OllamaBody, started: float
                  ) -> dict[str, Any]:  # fmt: skip
    """`/api/embed`'s answer (no reply: the model "loaded", no vectors)."""
    if reply is not None:
        check_dimensions(reply, body.dimensions)
    model = body.model
    took = int((time.perf_counter() - started) * 1e9)
    return {"model": model,
            "embeddings": [list(item.values) for item in reply.embeddings] if reply else [],
            "total_duration": took, "load_duration": 0,
            "prompt_eval_count": reply.usage.prompt_tokens if reply else 0}  # fmt: skip


def ollama_legacy_call(body: OllamaLegacyBody) -> pb.EmbedRequest | None:
    """`/api/embeddings`: one prompt, its vector as the model gives it (not normalized, as
    Ollama's); None for an empty prompt."""
    if not body.prompt:
        return None
    return pb.EmbedRequest(inputs=[body.prompt], truncate=True, normalize=False)


def ollama_legacy_answer(reply: pb.EmbedResponse | None, body: OllamaLegacyBody,
                         started: float) -> dict[str, Any]:  # fmt: skip
    return {"embedding": list(reply.embeddings[0].values) if reply else []}


class OllamaRoute(NamedTuple, Generic[B]):
    """One of Ollama's embedding routes: its body, its Embed call (None: nothing to embed)
    and its answer."""

    body: type[B]
    call: Callable[[B], pb.EmbedRequest | None]
    answer: Callable[[pb.EmbedResponse | None, B, float], dict[str, Any]]


OLLAMA_ROUTES: dict[str, OllamaRoute[Any]] = {
    "/api/embed": OllamaRoute(OllamaBody, ollama_call, ollama_answer),
    "/api/embeddings": OllamaRoute(OllamaLegacyBody, ollama_legacy_call, ollama_legacy_answer),
}


def _encoded(values: list[float], encoding: str) -> list[float] | str:
    """OpenAI's base64: the vector's little-endian float32 bytes (its client's default)."""
    if encoding == "float":
        return values
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")
