"""Serve through an existing Ollama server with the `ollama` client.

For hosts that already run Ollama (e.g. with the bundle's GGUF imported by
scripts/ollama-import.sh). Ollama applies the chat template and stop strings itself, and does
not expose a tokenizer, so prompt length is checked by Ollama rather than before queueing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from pydantic import Field

from services.core.validation import json_schema_object
from services.runtime.backends.base import (
    Backend,
    BackendError,
    BackendInfo,
    Finished,
    FinishReason,
    GenerationParams,
    PreparedPrompt,
    TokenPiece,
)
from services.runtime.backends.embeddings import Embedded, EmbeddingCancelled, EmbedSteps
from services.runtime.backends.registry import BackendEntry, ModelSource, register

_BLOB_DIGEST = re.compile(r"sha256[-:]([0-9a-f]{64})")


class OllamaBackend:
    def __init__(self, host: str, model: str, *, n_ctx: int, timeout_s: float = 300.0) -> None:
        import httpx
        import ollama

        self._model = model
        self._n_ctx = n_ctx
        self._client = ollama.Client(host=host, timeout=timeout_s)
        try:
            shown = self._client.show(model)
        except (ollama.ResponseError, httpx.HTTPError, ConnectionError) as err:
            raise BackendError(f"Ollama at {host} cannot show model {model!r}: {err}") from err
        details = shown.details
        modelinfo: dict[str, Any] = dict(shown.modelinfo or {})
        arch = modelinfo.get("general.architecture", "")
        digest = _BLOB_DIGEST.search(shown.modelfile or "")
        self._info = BackendInfo(
            backend="ollama",
            model_name=model,
            quantization=(details.quantization_level if details else None) or "unknown",
            context_length=n_ctx,
            trained_context_length=int(modelinfo.get(f"{arch}.context_length", n_ctx)),
            gguf_sha256=digest.group(1) if digest else "",
        )
        self.embedding_length = int(modelinfo.get(f"{arch}.embedding_length", 0))

    @property
    def info(self) -> BackendInfo:
        return self._info

    def prepare(self, messages: list[dict[str, str]]) -> PreparedPrompt:
        return PreparedPrompt(
            messages=tuple((m["role"], m["content"]) for m in messages),
            text=json.dumps(messages),
            tokens=None,
        )

    def prepare_text(self, text: str) -> PreparedPrompt:
        raise ValueError("the ollama backend serves chats (messages) only; serve the GGUF with "
                         "the llama.cpp backend for text completions")  # fmt: skip

    def validate_json_schema(self, schema: str) -> None:
        json_schema_object(schema)

    def validate_grammar(self, grammar: str) -> None:
        raise NotImplementedError(
            "Ollama's API takes JSON schemas (`format`), not llama.cpp "
            "grammars; serve the GGUF with the llama.cpp backend"
        )

    def generate(
        self, prompt: PreparedPrompt, params: GenerationParams, should_stop: Callable[[], bool]
    ) -> Iterator[TokenPiece | Finished]:
        import httpx
        import ollama

        options: dict[str, Any] = {
            "num_predict": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "min_p": params.min_p,
            "repeat_penalty": params.repeat_penalty,
            "frequency_penalty": params.frequency_penalty,
            "presence_penalty": params.presence_penalty,
            "seed": params.seed,
            "num_ctx": self._n_ctx,
        }
        if params.stop:
            options["stop"] = list(params.stop)
        messages = [{"role": role, "content": content} for role, content in prompt.messages]
        fmt = json.loads(params.json_schema) if params.json_schema else None
        text = ""
        produced = 0
        reason: FinishReason = "stop"
        prompt_tokens = 0
        try:
            stream = self._client.chat(
                self._model,
                messages,
                stream=True,
                logprobs=params.logprobs,
                top_logprobs=params.top_logprobs or None,
                options=options,
                format=fmt,
            )
            try:
                for chunk in stream:
                    if should_stop():
                        reason = "cancelled"
                        break
                    for piece in _pieces(chunk, len(text)):
                        text += piece.text
                        produced += 1
                        yield piece
                    if chunk.done:
                        prompt_tokens = chunk.prompt_eval_count or 0
                        produced = chunk.eval_count or produced
                        reason = "length" if chunk.done_reason == "length" else "stop"
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()  # drops the HTTP stream: Ollama stops generating
        except (ollama.ResponseError, httpx.HTTPError, ConnectionError) as err:
            raise BackendError(f"Ollama generation failed: {err}") from err
        yield Finished(reason=reason, prompt_tokens=prompt_tokens, completion_tokens=produced)

    # -- embeddings: Ollama's /api/embed, one text per call (its answer counts the tokens
    # of all texts together, and the runtime gives each text's count) ----------------------

    pooling = ""  # Ollama does not say how its model pools

    def embed(
        self, texts: list[str], *, truncate: bool, normalize: bool,
        should_stop: Callable[[], bool],
    ) -> EmbedSteps:  # fmt: skip
        import httpx
        import ollama

        if not normalize:
            raise NotImplementedError("normalize: Ollama's /api/embed gives unit vectors only")
        embedded = []
        for index, text in enumerate(texts):
            if should_stop():
                raise EmbeddingCancelled("cancelled")
            try:
                reply = self._client.embed(self._model, text, truncate=truncate,
                                           options={"num_ctx": self._n_ctx})  # fmt: skip
            except ollama.ResponseError as err:
                if err.status_code == 400:  # Ollama's refusal of this text (too long)
                    raise ValueError(f"inputs[{index}]: Ollama refused it: {err.error}") from err
                raise BackendError(f"Ollama embedding failed: {err}") from err
            except (httpx.HTTPError, ConnectionError) as err:
                raise BackendError(f"Ollama embedding failed: {err}") from err
            values = np.asarray(reply.embeddings[0], dtype=np.float32)
            embedded.append(Embedded(values, reply.prompt_eval_count or 0))
            yield
        return embedded

    def close(self) -> None:
        pass


def _pieces(chunk: Any, offset: int) -> Iterator[TokenPiece]:
    """One TokenPiece per reported token (with its logprob), or one for the whole chunk."""
    content = chunk.message.content or ""
    logprobs = chunk.logprobs or []
    if logprobs and "".join(lp.token for lp in logprobs) == content:
        for lp in logprobs:
            top = tuple((t.token.encode(), t.logprob) for t in lp.top_logprobs or [])
            yield TokenPiece(lp.token, offset, offset + len(lp.token), lp.logprob,
                             lp.token.encode(), top)  # fmt: skip
            offset += len(lp.token)
    elif content:
        yield TokenPiece(content, offset, offset + len(content), None)


def _check(settings: Any) -> None:
    if not settings.ollama_model and settings.bundle is None:
        raise ValueError("ollama_model: --backend ollama needs --ollama-model NAME")


def create(settings: Any, source: ModelSource) -> Backend:
    name = settings.ollama_model or (source.bundle.manifest.name if source.bundle else "")
    return OllamaBackend(settings.ollama_host, name, n_ctx=settings.n_ctx)


register(
    BackendEntry(
        "ollama",
        create,
        description="an existing Ollama server (scripts/ollama-import.sh loads a bundle into it)",
        options={
            "ollama_host": (
                str,
                Field("http://127.0.0.1:11434", description="Ollama server for --backend ollama"),
            ),
            "ollama_model": (
                str | None,
                Field(None, description="model name in Ollama (--backend ollama)"),
            ),
        },
        check=_check,
    )
)
