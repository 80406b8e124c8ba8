"""Tokenize and Detokenize: the served model's own tokenizer, as Generate uses it."""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import grpc

from services.core import validation as check
from services.core.api import pb
from services.core.sampling import LOGIT_BIAS_LIMIT
from services.core.validation import RpcFailure
from services.runtime.backends import Backend
from services.runtime.logprobs import token_logprob


@runtime_checkable
class SpecialText(Protocol):
    """A backend that exposes its tokenizer (the llama.cpp ones)."""

    def special_text(self, tokens: list[int]) -> bytes: ...

    def bare_tokens(self, text: str) -> list[int]: ...

    @property
    def vocab_size(self) -> int: ...


def tokenized(backend: Backend, request: pb.TokenizeRequest, context_length: int
              ) -> pb.TokenizeResponse:  # fmt: skip
    """The tokens Generate would prompt the model with for this chat or text."""
    text = check.raw_prompt(request)
    if request.bare and text is None:
        raise check.invalid("bare", "takes a prompt (a text), not messages")
    tokenizer = _tokenizer(backend)
    if request.bare and text is not None:
        tokens = tokenizer.bare_tokens(text)
    else:
        prompt = (backend.prepare(check.chat_messages(request)) if text is None
                  else backend.prepare_text(text))  # fmt: skip
        assert prompt.tokens is not None  # a backend that exposes its tokenizer counts them
        tokens = list(prompt.tokens)
    pieces = (
        [token_logprob(tokenizer.special_text([t]), token_id=t) for t in tokens]
        if request.with_pieces
        else []
    )
    return pb.TokenizeResponse(tokens=tokens, pieces=pieces, context_length=context_length)


def logit_bias(backend: Backend, request: pb.GenerateRequest) -> tuple[tuple[int, float], ...]:
    """Generate's `logit_bias`, sorted: each id a token of the model, each bias in range."""
    if not request.logit_bias:
        return ()
    size = _tokenizer(backend).vocab_size
    for token, bias in sorted(request.logit_bias.items()):
        if token >= size:
            raise check.invalid(f"logit_bias[{token}]", f"{token} is not a token of this model "
                                f"(its vocabulary is 0..{size - 1})")  # fmt: skip
        if not (math.isfinite(bias) and abs(bias) <= LOGIT_BIAS_LIMIT):
            raise check.invalid(f"logit_bias[{token}]", f"{bias:g} is out of range; use "
                                f"-{LOGIT_BIAS_LIMIT:g}..{LOGIT_BIAS_LIMIT:g}")  # fmt: skip
    return tuple(sorted(request.logit_bias.items()))


def detokenized(backend: Backend, request: pb.DetokenizeRequest) -> pb.DetokenizeResponse:
    """The text of the request's tokens; each must be one of the model's."""
    tokenizer = _tokenizer(backend)
    size = tokenizer.vocab_size
    for index, token in enumerate(request.tokens):
        if token >= size:
            raise check.invalid(f"tokens[{index}]", f"{token} is not a token of this model "
                                f"(its vocabulary is 0..{size - 1})")  # fmt: skip
    raw = tokenizer.special_text(list(request.tokens))
    return pb.DetokenizeResponse(text=raw.decode("utf-8", "replace"))


def _tokenizer(backend: Any) -> SpecialText:
    if not isinstance(backend, SpecialText):
        raise RpcFailure(grpc.StatusCode.UNIMPLEMENTED, f"the {backend.info.backend} backend "
                         "does not expose its model's tokenizer")  # fmt: skip
    return backend
