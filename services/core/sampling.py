"""Sampling parameters of one generation, as validated from a request."""

from __future__ import annotations

from dataclasses import dataclass

# Generate samples by default; Predict is greedy by default (a classifier should be stable).
GENERATE_DEFAULT_TEMPERATURE = 0.7
PREDICT_DEFAULT_TEMPERATURE = 0.0
# max_tokens when a call sets none, and the most it may ask for: the runtime's defaults (its
# settings may change them), and the router's when the API model answers a Generate.
MAX_TOKENS_DEFAULT = 256
MAX_TOKENS_LIMIT = 2048


@dataclass(frozen=True)
class SamplingDefaults:
    """What a call that does not set them gets: llama.cpp's sampling defaults (as
    `Llama.generate` and Ollama use them)."""

    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


SAMPLING_DEFAULTS = SamplingDefaults()


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    top_k: int = SAMPLING_DEFAULTS.top_k
    min_p: float = SAMPLING_DEFAULTS.min_p
    repeat_penalty: float = SAMPLING_DEFAULTS.repeat_penalty
    frequency_penalty: float = SAMPLING_DEFAULTS.frequency_penalty
    presence_penalty: float = SAMPLING_DEFAULTS.presence_penalty
    stop: tuple[str, ...] = ()
    json_schema: str | None = None
    grammar: str | None = None  # llama.cpp's GBNF; exclusive with json_schema
    # (token id, bias) added to the logits before sampling, ids sorted.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Per-token log-probabilities cost a softmax over the vocabulary each step: only Predict
    # (confidence) asks for them, and a Generate that wants them shown.
    logprobs: bool = False
    # The most likely tokens listed at each generated token's position (Generate's
    # `top_logprobs`); 0 lists none.
    top_logprobs: int = 0


# OpenAI's and llama.cpp's bound on the alternatives listed per token.
TOP_LOGPROBS_LIMIT = 20
# OpenAI's bound on a logit bias (llama.cpp's server takes any).
LOGIT_BIAS_LIMIT = 100.0
