from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from services.core.program import PromptCodec
from services.core.sampling import GenerationParams
from services.core.tokens import common_prefix_length
from services.runtime.backends.embeddings import EmbedSteps
from services.runtime.structured import OutputPlan

FinishReason = Literal["stop", "length", "stop_sequence", "cancelled"]


class BackendError(RuntimeError):
    """The model backend failed (not the client's fault)."""


@dataclass(frozen=True)
class BackendInfo:
    backend: str
    model_name: str
    quantization: str
    context_length: int
    trained_context_length: int
    gguf_sha256: str
    # The Jinja chat template chats are rendered with, and the BOS and EOS tokens' text it is
    # given; empty where the backend does not render chats itself.
    chat_template: str = ""
    bos_token: str = ""
    eos_token: str = ""


@dataclass(frozen=True)
class PreparedPrompt:
    """A chat rendered for the model. `tokens` is None when the backend cannot count them.

    With a `plan`, the answer is decoded by it (typed decoding): the prompt already ends with
    the plan's first header."""

    messages: tuple[tuple[str, str], ...]
    text: str
    tokens: tuple[int, ...] | None
    plan: OutputPlan | None = None


@dataclass(frozen=True)
class TokenPiece:
    """One generated token.

    `text` is what may be shown now (stop strings are held back until ruled out);
    [start, end) is the token's span in the whole generated text, `logprob` the model's
    log-probability of the token (None when the backend does not report it). Asked for
    `top_logprobs`, `token` holds the token's bytes and `top` the most likely tokens at its
    position with their log-probabilities, most likely first; `token_id` and `top_ids` their
    ids, where the backend knows them.
    """

    text: str
    start: int
    end: int
    logprob: float | None
    token: bytes = b""
    top: tuple[tuple[bytes, float], ...] = ()
    token_id: int | None = None
    top_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0
    text: str = ""  # any held-back text released at the end
    stop_sequence: str = ""  # the stop string that ended it (reason "stop_sequence")
    extra: dict[str, float] = field(default_factory=dict)
    decode_steps: int | None = None  # tokens sampled, when some were forced (typed decoding)
    # Typed decoding: each output field's confidence (a choice's probability among the
    # allowed values; the geometric-mean token probability of other values).
    field_confidence: dict[str, float] | None = None


class Backend(Protocol):
    @property
    def info(self) -> BackendInfo: ...

    def prepare(self, messages: list[dict[str, str]]) -> PreparedPrompt:
        """Apply the chat template; count tokens when possible. Thread-safe."""
        ...

    def prepare_text(self, text: str) -> PreparedPrompt:
        """A text to continue as is (no chat template, the beginning-of-text token added);
        ValueError when the backend serves chats only. Thread-safe."""
        ...

    def generate(
        self, prompt: PreparedPrompt, params: GenerationParams, should_stop: Callable[[], bool]
    ) -> Iterator[TokenPiece | Finished]:
        """Stream tokens, ending with exactly one Finished. Checks should_stop each step."""
        ...

    def validate_json_schema(self, schema: str) -> None:
        """Raise ValueError when the schema cannot constrain generation."""
        ...

    def validate_grammar(self, grammar: str) -> None:
        """Raise ValueError (the parser's message) when llama.cpp cannot parse the GBNF
        grammar, NotImplementedError when the backend takes no grammar."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class KeepsPrefixes(Protocol):
    """A backend holding the program's fixed prompt prefix evaluated (prefix reuse)."""

    @property
    def prefix_tokens(self) -> int: ...

    def warm(self) -> None:
        """One-time work (the program prefix), run by the thread that will step the backend."""
        ...


@dataclass(frozen=True)
class SlotState:
    """One slot, as at the call: the request decoding in it (its prompt's tokens and those
    generated so far), or idle; `held_tokens`, what its KV cache holds (the request's prompt
    and answer so far, or what the last request left for a next one sharing its prefix)."""

    id: int
    processing: bool
    held_tokens: int
    prompt_tokens: int = 0
    decoded_tokens: int = 0


@runtime_checkable
class HoldsContext(Protocol):
    """A one-at-a-time backend whose context keeps the last call's tokens."""

    @property
    def held_tokens(self) -> int: ...


@runtime_checkable
class BatchingBackend(Backend, KeepsPrefixes, Protocol):
    """A backend that decodes many requests together, stepped by one thread.

    `start` gives a request one of `slots`; each `step` runs one decode across all active
    requests and returns their events, keyed by the handle given to `start`.
    """

    slots: int

    @property
    def free_slots(self) -> int: ...

    def start(self, handle: Any, prompt: PreparedPrompt, params: GenerationParams) -> None: ...

    def cancel(self, handle: Any) -> Finished | None: ...

    def step(self) -> list[tuple[Any, TokenPiece | Finished]]: ...

    def slot_states(self) -> list[SlotState]:
        """Each slot's state; called off the stepping thread, so a snapshot."""
        ...


@runtime_checkable
class EmbeddingBackend(Protocol):
    """A backend that embeds texts: in steps the scheduler advances on the model's thread,
    between generation steps."""

    @property
    def pooling(self) -> str: ...

    @property
    def embedding_length(self) -> int:
        """The vectors' width (0: unknown until the first call)."""
        ...

    def embed(
        self, texts: list[str], *, truncate: bool, normalize: bool,
        should_stop: Callable[[], bool],
    ) -> EmbedSteps:  # fmt: skip
        """Each text's vector, in order, as steps (a generator returning them). ValueError
        naming `inputs[i]` for a text too long; EmbeddingCancelled once should_stop() holds
        between two steps."""
        ...


def program_prefix(backend: Backend, codec: PromptCodec) -> list[int]:
    """The prompt tokens every Predict of this program starts with, whatever its inputs."""
    renders = [backend.prepare(codec.format_messages(codec.placeholder_inputs(value)))
               for value in ("a", "zq 7")]  # fmt: skip
    tokens = [r.tokens for r in renders if r.tokens is not None]
    return list(tokens[0][: common_prefix_length(tokens)]) if len(tokens) == 2 else []


def usable_cache(shared: int, last: int) -> int:
    """How many cached tokens a prompt may start from, given `shared` match its own.

    The last prompt token is always evaluated (its logits start generation), and never alone
    after cached ones: a lone sequence evaluates a fresh prompt in one piece, so a one-token
    tail would be computed by another kernel (llamacpp_batched.py's note).
    """
    cached = min(shared, last)
    return cached - 1 if cached == last and cached > 0 else cached
