"""Embeddings from the served GGUF: a second llama.cpp context, in embedding mode, over the
model already loaded (the weights are shared; the context adds only its own buffers). It is
made on the first call, so a runtime that embeds nothing pays nothing."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.runtime.backends.llama_log import llama_log_captured

log = logging.getLogger(__name__)

# llama.cpp's enum llama_pooling_type, by the names the API gives them.
POOLING = {1: "mean", 2: "cls", 3: "last"}
_MEAN = 1
# Texts decoded together hold at most this many tokens (a longer text is decoded alone): one
# decode is one step between generation steps, so this bounds how long a token waits.
STEP_TOKENS = 256


class EmbeddingCancelled(Exception):
    """The call was cancelled, or its deadline passed, between two decodes."""


@dataclass(frozen=True)
class Embedded:
    values: np.ndarray  # float32, the model's embedding width
    tokens: int  # the text's tokens the model read
    truncated: bool = False


def pooling_of(meta: dict[str, Any]) -> int:
    """The GGUF's own pooling when it declares one that yields a vector per text (an
    embedding model's); else the mean of the token states (a generative model's)."""
    declared = meta.get(f"{meta.get('general.architecture')}.pooling_type")
    return int(declared) if declared in POOLING else _MEAN


def fit(tokens: list[int], limit: int, truncate: bool, where: str) -> tuple[list[int], bool]:
    """The tokens the model reads: ValueError("where: ...") for a text longer than the
    context, unless asked to truncate it."""
    if len(tokens) <= limit:
        return tokens, False
    if not truncate:
        raise ValueError(f"{where}: {len(tokens)} tokens exceed the context of {limit}; "
                         "shorten it or set truncate")  # fmt: skip
    return tokens[:limit], True


def normalized(values: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(values))
    return values / norm if norm > 0 else values


class Embedder:
    """One embedding context, used on the model's thread (one call at a time)."""

    def __init__(self, model: Any, *, n_ctx: int, n_threads: int, pooling: int) -> None:
        import llama_cpp
        from llama_cpp import _internals

        params = llama_cpp.llama_context_default_params()
        # A text's tokens are pooled within one micro-batch, so it takes the whole context;
        # short texts share one (a sequence each, in one KV stream), as `Llama.embed` packs them.
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_seq_max = min(n_ctx, llama_cpp.llama_max_parallel_sequences())
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = n_threads
        params.embeddings = True
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        params.pooling_type = pooling
        with llama_log_captured() as said:  # its notes become our log's, not bare stderr
            try:
                self._context = _internals.LlamaContext(model=model, params=params, verbose=False)
            except ValueError as err:  # llama.cpp made no context: its log says why
                raise ValueError(f"{err}: {''.join(said).strip()[-400:]}") from None
        for line in "".join(said).splitlines():
            log.debug("llama.cpp: %s", line)
        self._batch = _internals.LlamaBatch(n_tokens=n_ctx, embd=0, n_seq_max=1, verbose=False)
        self._width = int(model.n_embd())
        self._lock = threading.Lock()
        self.n_ctx = n_ctx
        self.max_texts = int(params.n_seq_max)
        self.pooling = POOLING[pooling]

    def embed(self, texts: list[list[int]]) -> list[np.ndarray]:
        """The pooled vector of each text, decoded together: their tokens at most n_ctx in
        all, at most max_texts of them (`packed` groups them so)."""
        with self._lock:
            self._context.kv_cache_clear()
            self._batch.reset()
            for sequence, tokens in enumerate(texts):
                self._batch.add_sequence(tokens, sequence, True)  # every token's state pooled
            self._context.decode(self._batch)
            return [np.ctypeslib.as_array(self._context.get_embeddings_seq(sequence),
                                          shape=(self._width,)).astype(np.float32)
                    for sequence in range(len(texts))]  # fmt: skip

    def close(self) -> None:
        self._batch.close()
        self._context.close()


EmbedSteps = Generator[None, None, list[Embedded]]


def embed_steps(
    embedder: Callable[[], Embedder], tokenize: Callable[[str], list[int]], texts: list[str], *,
    truncate: bool, normalize: bool, should_stop: Callable[[], bool],
) -> EmbedSteps:  # fmt: skip
    """Each text's vector, in order, one decode per step: the scheduler advances it on the
    model's thread between generation steps (every llama.cpp computation belongs on that
    one thread: see BatchedLlamaCpp.set_prefix). ValueError naming `inputs[i]` for a text too
    long; EmbeddingCancelled once should_stop() holds before a decode."""
    context = embedder()
    fitted = [fit(tokenize(text), context.n_ctx, truncate, f"inputs[{index}]")
              for index, text in enumerate(texts)]  # fmt: skip
    embedded = []
    step_tokens = min(context.n_ctx, STEP_TOKENS)
    for group in packed([len(tokens) for tokens, _ in fitted], step_tokens,
                        context.max_texts):  # fmt: skip
        if should_stop():
            raise EmbeddingCancelled("cancelled")
        vectors = context.embed([fitted[index][0] for index in group])
        for index, values in zip(group, vectors, strict=True):
            tokens, truncated = fitted[index]
            embedded.append(Embedded(normalized(values) if normalize else values, len(tokens),
                                     truncated))  # fmt: skip
        yield
    return embedded


def run_steps(steps: EmbedSteps) -> list[Embedded]:
    """All of it at once, for callers without a scheduler (tests, tools)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def packed(lengths: list[int], limit: int, max_texts: int) -> list[list[int]]:
    """Consecutive texts (by index) grouped to be decoded together: each group's tokens at
    most `limit` in all (a longer text alone) and at most `max_texts` texts."""
    groups: list[list[int]] = []
    used = limit + 1
    for index, length in enumerate(lengths):
        if used + length > limit or len(groups[-1]) >= max_texts:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += length
    return groups
