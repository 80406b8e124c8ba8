"""In-process llama.cpp through llama-cpp-python: the default backend."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, get_args

import numpy as np

from services.core.bundle import sha256_file
from services.core.config import KvCacheType
from services.core.gguf_metadata import ModelFileError, quantization_name, read_gguf_metadata
from services.core.program import PromptCodec
from services.core.tokens import common_prefix_length
from services.runtime.backends.base import (
    Backend,
    BackendError,
    BackendInfo,
    Finished,
    FinishReason,
    GenerationParams,
    PreparedPrompt,
    TokenPiece,
    program_prefix,
    usable_cache,
)
from services.runtime.backends.embeddings import (
    POOLING,
    Embedder,
    EmbedSteps,
    embed_steps,
    pooling_of,
)
from services.runtime.backends.grammars import (
    check_parses,
    gbnf_grammar,
    grammar_for,
    output_grammar,
    value_grammar,
)
from services.runtime.backends.registry import BackendEntry, ModelSource, register
from services.runtime.backends.text import StopStringBuffer
from services.runtime.structured import (
    OutputPlan,
    PlanCursor,
    Step,
    constrain_logits,
)


def kv_cache_ggml_type(kv_cache_type: str) -> int:
    """ggml's number type of a KV cache type as llama.cpp's server names it (`q8_0` →
    GGML_TYPE_Q8_0)."""
    import llama_cpp

    if kv_cache_type not in get_args(KvCacheType):
        raise ValueError(f"unknown KV cache type {kv_cache_type!r}")
    return int(getattr(llama_cpp, f"GGML_TYPE_{kv_cache_type.upper()}"))


def needs_flash_attention(kv_cache_type: str) -> bool:
    """llama.cpp computes attention over a quantized V cache only with flash attention; an
    f16 or f32 cache keeps it off, as `Llama` does (greedy outputs then match its own)."""
    return kv_cache_type not in ("f16", "f32")


class ChatModel:
    """A GGUF's tokenizer side (metadata, chat template, tokenization) and its embedding
    context. Shared by backends."""

    def __init__(self, model_path: Path, *, n_ctx: int, n_threads: int, n_gpu_layers: int = 0,
                 model: Any = None, meta: dict[str, Any] | None = None,
                 embed_ctx: int | None = None) -> None:  # fmt: skip
        from llama_cpp import _internals
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.path = model_path
        self.meta = meta if meta is not None else read_gguf_metadata(model_path)
        template = self.meta.get("tokenizer.chat_template")
        if not template:
            raise ModelFileError(f"{model_path}: GGUF has no tokenizer.chat_template")
        arch = self.meta["general.architecture"]
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.embed_ctx = min(embed_ctx or n_ctx, n_ctx)
        self.trained_ctx = int(self.meta.get(f"{arch}.context_length", n_ctx))
        self._owns_model = model is None
        if model is None:
            import llama_cpp

            params = llama_cpp.llama_model_default_params()
            params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers == -1 else n_gpu_layers
            try:
                model = _internals.LlamaModel(
                    path_model=str(model_path), params=params, verbose=False
                )
            except Exception as err:
                raise ModelFileError(f"{model_path}: llama.cpp could not load it ({err})") from err
        self.model = model
        eos = self._token_text(model.token_eos())
        bos = self._token_text(model.token_bos())
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        self._template = str(template)
        self._bos_text = bos
        self._eos_text = eos
        self._tokenize_lock = threading.Lock()
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()

    def _token_text(self, token: int) -> str:
        return "" if token < 0 else str(self.model.token_get_text(token))

    def prepare(self, messages: list[dict[str, str]]) -> PreparedPrompt:
        rendered = self._formatter(messages=messages)  # type: ignore[arg-type]
        return PreparedPrompt(
            messages=tuple((m["role"], m["content"]) for m in messages),
            text=rendered.prompt,
            tokens=self._prompt_tokens(rendered.prompt),
        )

    def prepare_text(self, text: str) -> PreparedPrompt:
        return PreparedPrompt(messages=(), text=text, tokens=self._prompt_tokens(text))

    def _prompt_tokens(self, text: str) -> tuple[int, ...]:
        # A text that begins with the BOS itself (Gemma's template writes it) gets no second.
        add_bos = not (self._bos_text and text.startswith(self._bos_text))
        with self._tokenize_lock:
            return tuple(self.model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def info(self, model_name: str | None, gguf_sha256: str | None, backend: str) -> BackendInfo:
        return BackendInfo(
            backend=backend,
            model_name=model_name or str(self.meta.get("general.name") or self.path.stem),
            quantization=quantization_name(self.meta),
            context_length=self.n_ctx,
            trained_context_length=self.trained_ctx,
            gguf_sha256=gguf_sha256 or sha256_file(self.path),
            chat_template=self._template,
            bos_token=self._bos_text,
            eos_token=self._eos_text,
        )

    def text_tokens(self, text: str) -> list[int]:
        """A text's tokens as an embedding reads them: special tokens not parsed, the BOS
        (and EOS) where the tokenizer adds them."""
        with self._tokenize_lock:
            return list(self.model.tokenize(text.encode("utf-8"), True, False))

    def embedder(self) -> Embedder:
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = Embedder(self.model, n_ctx=self.embed_ctx,
                                          n_threads=self.n_threads,
                                          pooling=pooling_of(self.meta))  # fmt: skip
            return self._embedder

    def close(self) -> None:
        if self._embedder is not None:
            self._embedder.close()
        if self._owns_model:
            self.model.close()


class ChatModelMethods:
    """What both llama.cpp backends answer from the GGUF's tokenizer side."""

    _chat: ChatModel
    _info: BackendInfo

    @property
    def info(self) -> BackendInfo:
        return self._info

    def prepare(self, messages: list[dict[str, str]]) -> PreparedPrompt:
        return self._chat.prepare(messages)

    def prepare_text(self, text: str) -> PreparedPrompt:
        return self._chat.prepare_text(text)

    def validate_json_schema(self, schema: str) -> None:
        check_parses(self._chat.model.vocab, grammar_for(schema))

    def validate_grammar(self, grammar: str) -> None:
        check_parses(self._chat.model.vocab, gbnf_grammar(grammar))

    # -- what typed decoding asks (services/runtime/structured.py: Tokenizer) ---------------

    def tokenize_text(self, text: str) -> list[int]:
        with self._chat._tokenize_lock:
            return list(self._chat.model.tokenize(text.encode("utf-8"), False, False))

    def token_bytes(self, token: int) -> bytes:
        return bytes(self._chat.model.detokenize([token]))

    def bare_tokens(self, text: str) -> list[int]:
        """A text's tokens as a prompt's are made, special tokens parsed, with no BOS."""
        with self._chat._tokenize_lock:
            return list(self._chat.model.tokenize(text.encode("utf-8"), False, True))

    def special_text(self, tokens: list[int]) -> bytes:
        """The tokens' bytes, a special token as its text ("<|im_start|>"), as llama.cpp's
        server detokenizes."""
        return b"".join(bytes(self._chat.model.detokenize([t], special=True)) for t in tokens)

    @property
    def vocab_size(self) -> int:
        return int(self._chat.model.n_vocab())

    # -- embeddings (a context of their own, in steps on the model's thread) ----------------

    @property
    def pooling(self) -> str:
        return POOLING[pooling_of(self._chat.meta)]

    @property
    def embedding_length(self) -> int:
        return int(self._chat.model.n_embd())

    def embed(
        self, texts: list[str], *, truncate: bool, normalize: bool,
        should_stop: Callable[[], bool],
    ) -> EmbedSteps:  # fmt: skip
        return embed_steps(self._embedder, self._chat.text_tokens, texts, truncate=truncate,
                           normalize=normalize, should_stop=should_stop)  # fmt: skip

    def _embedder(self) -> Embedder:
        try:
            return self._chat.embedder()
        except ValueError as err:  # llama.cpp made no context (no memory for it)
            raise BackendError(f"no embedding context: {err}") from err


class LlamaCppBackend(ChatModelMethods):
    """One llama.cpp model and context; generate() is called from one thread at a time."""

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int,
        n_threads: int,
        n_batch: int = 512,
        n_gpu_layers: int = 0,
        model_name: str | None = None,
        gguf_sha256: str | None = None,
        embed_ctx: int | None = None,
        kv_cache_type: str = "f16",
    ) -> None:
        from llama_cpp import Llama

        meta = read_gguf_metadata(model_path)  # a clear refusal before llama.cpp sees a bad file
        cache = kv_cache_ggml_type(kv_cache_type)
        try:
            self._llm = Llama(
                model_path=str(model_path),
                n_ctx=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                n_batch=n_batch,
                n_gpu_layers=n_gpu_layers,
                logits_all=False,
                type_k=cache,
                type_v=cache,
                flash_attn=needs_flash_attention(kv_cache_type),
                verbose=False,
            )
        except Exception as err:
            raise ModelFileError(f"{model_path}: llama.cpp could not load it ({err})") from err
        self._chat = ChatModel(model_path, n_ctx=n_ctx, n_threads=n_threads,
                               model=self._llm._model, meta=meta, embed_ctx=embed_ctx)  # fmt: skip
        self._vocab = self._llm._model.vocab
        self._n_vocab = self._llm.n_vocab()
        self._info = self._chat.info(model_name, gguf_sha256, backend="llama.cpp")
        self._prefixes: list[tuple[int, ...]] = []
        self._prefix_states: dict[tuple[int, ...], Any] = {}

    def set_prefixes(self, prefixes: list[list[int]]) -> None:
        """Fixed prompt prefixes (the program's, one per predictor). Each is evaluated by
        `warm` (else on first use) and its KV state kept: a call whose prefix the context no
        longer holds (a Generate or another predictor's call came between) restores it
        instead of evaluating it again."""
        self._prefixes = [tuple(p) for p in prefixes if len(p) > 1]

    def warm(self) -> None:
        """Evaluate and keep every prefix now, on the thread that will generate, before the
        server says it is ready: the first call does not pay for it."""
        llm = self._llm
        for prefix in self._prefixes:
            held = common_prefix_length([list(llm._input_ids[: llm.n_tokens]), list(prefix)])
            self._keep_prefix(prefix, held)

    @property
    def held_tokens(self) -> int:
        """Tokens the context holds (the last call's, for the next one sharing its start)."""
        return int(self._llm.n_tokens)

    @property
    def prefix_tokens(self) -> int:
        """Tokens of the kept prefixes, all predictors' together."""
        return sum(len(prefix) for prefix in self._prefix_states)

    def _keep_prefix(self, prefix: tuple[int, ...], held: int) -> None:
        """Evaluate what the context (holding `held` of the prefix) lacks of it; keep it."""
        llm = self._llm
        llm.n_tokens = usable_cache(held, len(prefix) - 1)
        llm.eval(list(prefix[llm.n_tokens :]))
        self._prefix_states[prefix] = llm.save_state()

    def _restore_prefix(self, tokens: list[int], held: int) -> bool:
        """Put the prompt's fixed prefix in the context (which holds `held` of the prompt's
        first tokens); True when some of it was evaluated now."""
        llm = self._llm
        for prefix in self._prefixes:
            if held >= len(prefix) or len(tokens) < len(prefix) + 2:
                continue
            if tuple(tokens[: len(prefix)]) != prefix:
                continue
            state = self._prefix_states.get(prefix)
            if state is None:  # not warmed (a bench's bare backend): kept at first use
                self._keep_prefix(prefix, held)
                return True
            llm.load_state(state)
            return False
        return False

    @property
    def llama(self) -> Any:
        """The underlying llama_cpp.Llama (benchmarks compare against it directly)."""
        return self._llm

    def _cached_prefix(self, tokens: list[int]) -> tuple[int, int]:
        """Put the longest reusable prefix of `tokens` in the context: where the prompt's
        evaluation starts, and how many of its tokens the call found cached."""
        llm = self._llm
        before = common_prefix_length([list(llm._input_ids[: llm.n_tokens]), tokens])
        evaluated = self._restore_prefix(tokens, before)
        held = common_prefix_length([list(llm._input_ids[: llm.n_tokens]), tokens])
        start = usable_cache(held, len(tokens) - 1)
        return start, min(start, before) if evaluated else start

    def generate(
        self, prompt: PreparedPrompt, params: GenerationParams, should_stop: Callable[[], bool]
    ) -> Iterator[TokenPiece | Finished]:
        import llama_cpp

        if prompt.plan is not None:
            yield from self._generate_planned(prompt, prompt.plan, params, should_stop)
            return
        llm = self._llm
        assert prompt.tokens is not None
        tokens = list(prompt.tokens)
        start, cached = self._cached_prefix(tokens)
        llm.n_tokens = start  # else llama-cpp-python's own match may leave a one-token tail
        grammar = output_grammar(params)
        greedy = params.temperature <= 0.0
        llm.set_seed(params.seed)
        buffer = StopStringBuffer(params.stop)
        n_ctx = llm.n_ctx()
        produced = 0
        reason: FinishReason = "length"
        try:
            stream = llm.generate(
                tokens,
                temp=0.0 if greedy else params.temperature,
                top_p=1.0 if greedy else params.top_p,
                top_k=0 if greedy else params.top_k,
                min_p=0.0 if greedy else params.min_p,
                repeat_penalty=params.repeat_penalty,
                frequency_penalty=params.frequency_penalty,
                presence_penalty=params.presence_penalty,
                grammar=grammar,
                logits_processor=biased_logits(params.logit_bias),
            )
        except Exception as err:
            raise BackendError(f"llama.cpp generation failed to start: {err}") from err
        try:
            for token in stream:
                if should_stop():
                    reason = "cancelled"
                    break
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    reason = "stop"
                    break
                produced += 1
                yield logprob_piece(buffer.feed(llm.detokenize([token])), buffer, llm._ctx.ctx, -1,
                                    self._n_vocab, token, params, llm.detokenize)  # fmt: skip
                if buffer.stopped:
                    reason = "stop_sequence"
                    break
                if produced >= params.max_tokens or len(tokens) + produced >= n_ctx:
                    reason = "length"
                    break
        finally:
            stream.close()
        yield Finished(
            reason=reason,
            prompt_tokens=len(tokens),
            completion_tokens=produced,
            cached_prompt_tokens=max(0, cached),
            text=buffer.flush() if reason != "cancelled" else "",
            stop_sequence=buffer.stopped_by,
        )

    def _generate_planned(
        self, prompt: PreparedPrompt, plan: OutputPlan, params: GenerationParams,
        should_stop: Callable[[], bool],
    ) -> Iterator[TokenPiece | Finished]:  # fmt: skip
        """Typed decoding: sample only the values, force the scaffold (structured.py)."""
        llm = self._llm
        assert prompt.tokens is not None
        tokens = list(prompt.tokens)
        start, cached = self._cached_prefix(tokens)
        llm.n_tokens = start  # eval drops the context's cells from here on
        answer = PlannedAnswer(self._chat.model, plan, params)
        pending, reason = tokens[start:], "length"
        try:
            while True:
                if should_stop():
                    reason = "cancelled"
                    break
                llm.eval(pending)
                token, step, logprob = answer.sample(llm._ctx, -1)
                yield answer.piece(step.text, logprob)
                if step.done:
                    reason = "stop"
                    break
                room = llm.n_ctx() - llm.n_tokens - 1 - len(step.forced)
                if answer.steps >= params.max_tokens or room <= 0:
                    break
                pending = [token, *step.forced]
        finally:
            answer.close()
        yield answer.finished(reason, len(tokens), cached)  # type: ignore[arg-type]

    def close(self) -> None:
        self._chat.close()
        self._llm.close()


def token_logprobs(
    ctx: Any, index: int, n_vocab: int, token: int, top: int
) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) under the model (its logits' softmax at batch position `index`, before
    any sampler), and the `top` most likely tokens with theirs, most likely first."""
    import llama_cpp

    pointer = llama_cpp.llama_get_logits_ith(ctx, index)
    logits = np.ctypeslib.as_array(pointer, shape=(n_vocab,))
    peak = float(logits.max())
    log_total = peak + float(np.log(np.exp(logits - peak).sum()))
    likeliest: list[tuple[int, float]] = []
    if top:
        ids = np.argpartition(-logits, top)[:top]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        likeliest = [(int(i), float(logits[i]) - log_total) for i in ids]
    return float(logits[token]) - log_total, likeliest


def logprob_piece(
    fed: tuple[str, int, int], buffer: StopStringBuffer, ctx: Any, index: int, n_vocab: int,
    token: int, params: GenerationParams, detokenize: Callable[[list[int]], bytes],
) -> TokenPiece:  # fmt: skip
    """A free-text token as a piece (what `buffer.feed` gave for it), with what `params` asks
    of its log-probabilities: none for a token the stop string swallowed whole."""
    text, start, end = fed
    if not params.logprobs or (buffer.stopped and start == end):
        return TokenPiece(text, start, end, None)
    logprob, top = token_logprobs(ctx, index, n_vocab, token, params.top_logprobs)
    alternatives = tuple((bytes(detokenize([i])), value) for i, value in top)
    return TokenPiece(text, start, end, logprob, bytes(detokenize([token])), alternatives,
                      token, tuple(i for i, _ in top))  # fmt: skip


class PlannedAnswer:
    """One typed-decoding answer on a llama.cpp context: its cursor and sampler chains.

    Shared by both llama.cpp engines: each evaluates what `sample` asks (the sampled token
    and the forced tokens after it), then calls `sample` on the new logits."""

    def __init__(self, model: Any, plan: OutputPlan, params: GenerationParams) -> None:
        self._model = model
        self._params = params
        self.cursor = PlanCursor(plan, lambda token: bytes(model.detokenize([token])))
        self._chain = sampler_chain(model, params)
        self._grammar_chain: tuple[tuple[str, bool], Any] | None = None  # of a JSON value
        self._n_vocab = int(model.n_vocab())
        self.steps = 0  # tokens sampled: decode steps
        self._shown = ""
        self._header = plan.header_text  # shown with the first sampled token (its first piece)

    def _sampler(self) -> Any:
        schema = self.cursor.grammar()
        if schema is None:
            return self._chain
        if self._grammar_chain is None or self._grammar_chain[0] != schema:
            self._close_grammar()
            grammar = value_grammar(*schema, self._first_after_text())
            self._grammar_chain = (schema, sampler_chain(self._model, self._params, grammar))
        return self._grammar_chain[1]

    def _first_after_text(self) -> str:
        return bytes(self._model.detokenize([self.cursor.field.after[0]])).decode("utf-8")

    def sample(self, ctx: Any, index: int) -> tuple[int, Step, float | None]:
        """Constrain the logits at batch position `index`, sample, and advance the cursor."""
        import llama_cpp

        pointer = llama_cpp.llama_get_logits_ith(ctx.ctx, index)
        logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
        grammar_value = self.cursor.grammar() is not None
        total, allowed_total = constrain_logits(logits, self.cursor.allowed())
        token = int(self._sampler().sample(ctx, index))
        self.steps += 1
        if llama_cpp.llama_vocab_is_eog(self._model.vocab, token):
            step = self.cursor.accept(token, 0.0, 0.0, eog=True)
            logprob = None
        else:
            logprob = float(logits[token]) - total
            step = self.cursor.accept(token, logprob, float(logits[token]) - allowed_total, False)
        if grammar_value and self.cursor.grammar() is None:
            self._close_grammar()
        return token, step, logprob

    def piece(self, text: str, logprob: float | None) -> TokenPiece:
        text, self._header = self._header + text, ""
        start = len(self._shown)
        self._shown += text
        return TokenPiece(text=text, start=start, end=len(self._shown), logprob=logprob)

    def finished(self, reason: FinishReason, prompt_tokens: int, cached: int) -> Finished:
        """Usage as if the model had written the whole answer: the first header counts as
        completion, not prompt, and completion_tokens is the answer's length in tokens
        (sampled, forced, or written without evaluation at the end); decode_steps the sampled."""
        asked = prompt_tokens - len(self.cursor.plan.header)
        answer = self._model.tokenize(self._shown.encode("utf-8"), False, False)
        return Finished(
            reason=reason, prompt_tokens=asked, completion_tokens=len(answer),
            cached_prompt_tokens=max(0, min(cached, asked)),
            decode_steps=self.steps, field_confidence=dict(self.cursor.confidences),
        )  # fmt: skip

    def _close_grammar(self) -> None:
        if self._grammar_chain is not None:
            self._grammar_chain[1].close()
            self._grammar_chain = None

    def close(self) -> None:
        self._close_grammar()
        self._chain.close()


def biased_logits(bias: tuple[tuple[int, float], ...]) -> Any:
    """`Llama.generate`'s logits processor adding each token's bias (as its
    `create_completion(logit_bias=...)` adds them); None without any."""
    if not bias:
        return None
    from llama_cpp import LogitsProcessorList

    ids = np.array([token for token, _ in bias], dtype=np.intc)
    values = np.array([value for _, value in bias], dtype=np.single)

    def add_bias(_input_ids: Any, scores: Any) -> Any:
        biased = np.copy(scores)
        biased[ids] += values
        return biased

    return LogitsProcessorList([add_bias])


def sampler_chain(model: Any, params: GenerationParams, grammar: Any = None) -> Any:
    """The chain `Llama.generate` builds for these settings (its no-op stages left out)."""
    from llama_cpp import _internals

    sampler = _internals.LlamaSampler()
    if params.logit_bias:  # first, as Llama.generate applies a logits processor
        sampler.add_logit_bias(model.n_vocab(), dict(params.logit_bias))
    penalties = (params.repeat_penalty, params.frequency_penalty, params.presence_penalty)
    if penalties != (1.0, 0.0, 0.0):  # over the last 64 tokens, as Llama.generate's default
        sampler.add_penalties(model.n_vocab(), 64, *penalties)
    if grammar is None:
        grammar = output_grammar(params)
    if grammar is not None:
        sampler.add_grammar(model, grammar)
    if params.temperature <= 0.0:
        sampler.add_greedy()
    else:
        sampler.add_top_k(params.top_k)
        sampler.add_top_p(params.top_p, 1)
        sampler.add_min_p(params.min_p, 1)
        sampler.add_temp(params.temperature)
        sampler.add_dist(params.seed)
    return sampler


def keep_prefixes(backend: LlamaCppBackend, codecs: Sequence[PromptCodec]) -> None:
    """Keep each predictor's fixed prompt prefix across other predictors' calls
    (--prefix-cache): a multi-step program's calls do not evaluate it again."""
    if codecs:
        backend.set_prefixes([program_prefix(backend, codec) for codec in codecs])


def create(settings: Any, source: ModelSource) -> Backend:
    """One call at a time, or with --parallel > 1 the batched engine (continuous batching)."""
    path, sha, name = source.gguf()
    if settings.parallel == 1:
        backend = LlamaCppBackend(
            path, n_ctx=settings.n_ctx, n_threads=settings.n_threads, n_batch=settings.n_batch,
            n_gpu_layers=settings.n_gpu_layers, model_name=name, gguf_sha256=sha,
            embed_ctx=settings.embed_ctx, kv_cache_type=settings.kv_cache_type,
        )  # fmt: skip
        if settings.prefix_cache:
            keep_prefixes(backend, source.codecs)
        return backend
    from services.runtime.backends.llamacpp_batched import BatchedLlamaCpp

    codecs = source.codecs if settings.prefix_cache else ()
    batched = BatchedLlamaCpp(
        path, n_ctx=settings.n_ctx, n_threads=settings.n_threads, parallel=settings.parallel,
        n_batch=settings.n_batch, n_gpu_layers=settings.n_gpu_layers, model_name=name,
        gguf_sha256=sha, prefixes=len(codecs), embed_ctx=settings.embed_ctx,
        kv_cache_type=settings.kv_cache_type,
    )  # fmt: skip
    if codecs:  # evaluated by the scheduler; a multi-step program: one per predictor
        prefixes = [program_prefix(batched, codec) for codec in codecs]
        batched.set_prefix(prefixes[0], extra=prefixes[1:])
    return batched


register(
    BackendEntry(
        "llama.cpp", create, description="llama.cpp in-process: the GGUF of --model or --bundle"
    )
)
