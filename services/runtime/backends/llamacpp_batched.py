"""llama.cpp with continuous batching and a warm program prefix.

llama-cpp-python's high-level `Llama` decodes one sequence at a time. Here one llama.cpp
context holds `parallel` sequences (one KV-cache sequence per request) and every step decodes
one `llama_batch` with each running request's last sampled token, then evaluates up to
`n_batch` tokens of joining prompts. Requests join between steps and free their slot when they
finish, so a short call never waits for a long one to end.

The program's fixed prompt prefix (instructions, field structure, demos) is evaluated once,
before the first request, into a reserved sequence, and `llama_memory_seq_cp` copies its KV
into every idle slot (and back into a slot another prompt took over), so a Predict call
evaluates only its own inputs. A multi-step program's other predictors have their prefixes in
reserved sequences of their own, copied into a slot when a call of theirs starts there.

Greedy outputs are token-for-token those of the one-at-a-time backend (tested). llama.cpp is
not bit-identical across batch layouts (ggml-org/llama.cpp#6950): on the CPU, attention over a
sequence's cache takes one kernel for a single query row and another for several, and the two
round differently. So each sequence has its own KV stream (cells in the order a lone sequence
has them), decoding rows (one per sequence, as when decoding alone) go in one call, and prompt
tokens go in calls of their own, in pieces of at least two tokens: a one-token piece is allowed
only where a lone sequence has one too (a one-token prompt, position 0).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.core.gguf_metadata import ModelFileError
from services.core.tokens import common_prefix_length
from services.runtime.backends.base import (
    BackendError,
    Finished,
    FinishReason,
    GenerationParams,
    PreparedPrompt,
    SlotState,
    TokenPiece,
    usable_cache,
)
from services.runtime.backends.llamacpp import (
    ChatModel,
    ChatModelMethods,
    PlannedAnswer,
    kv_cache_ggml_type,
    logprob_piece,
    needs_flash_attention,
    sampler_chain,
)
from services.runtime.backends.text import StopStringBuffer

log = logging.getLogger(__name__)


@dataclass
class _Sequence:
    """One request in a slot: its KV-cache sequence, sampler and output so far."""

    handle: Any
    seq_id: int
    prompt_len: int
    pending: list[int]  # tokens to feed next: the prompt's uncached tail, or the last sample
    n_past: int  # tokens of this sequence already in the KV cache
    params: GenerationParams
    sampler: Any
    cached: int
    buffer: StopStringBuffer
    produced: int = 0
    logits_index: int = -1
    events: list[TokenPiece | Finished] = field(default_factory=list)
    answer: PlannedAnswer | None = None  # typed decoding (the prompt has a plan)


class BatchedLlamaCpp(ChatModelMethods):
    """A llama.cpp context shared by up to `parallel` requests, stepped by one thread."""

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int,
        n_threads: int,
        parallel: int,
        n_batch: int = 512,
        n_gpu_layers: int = 0,
        model_name: str | None = None,
        gguf_sha256: str | None = None,
        prefixes: int = 1,
        embed_ctx: int | None = None,
        kv_cache_type: str = "f16",
    ) -> None:
        """`prefixes`: how many warm prefixes to hold, each in a reserved KV stream of its
        own (a program's; a multi-step program's one per predictor; 0 for raw generation)."""
        import llama_cpp
        from llama_cpp import _internals, _logger

        _logger.set_verbose(False)  # llama.cpp's own log lines only for errors, as `Llama` does
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        if prefixes < 0:
            raise ValueError("prefixes must be at least 0")
        if n_batch < 3:  # room for a piece of two that leaves no single token behind
            raise ValueError("n_batch must be at least 3")
        self.slots = parallel
        self._chat = ChatModel(model_path, n_ctx=n_ctx, n_threads=n_threads,
                               n_gpu_layers=n_gpu_layers, embed_ctx=embed_ctx)  # fmt: skip
        self._model = self._chat.model
        self._n_ctx = n_ctx
        self._n_batch = n_batch
        self._reserved = [parallel + i for i in range(prefixes)]  # sequences of warm prefixes
        self._prefix_seq = self._reserved[0] if prefixes else None  # the program's
        self._prefix: list[int] = []
        self._prefix_pending: list[int] | None = None
        self._extra_seqs = self._reserved[1:]
        self._extra: list[tuple[int, list[int]]] = []  # (sequence, its prefix)
        self._extra_pending: list[list[int]] = []
        params = llama_cpp.llama_context_default_params()
        # One KV stream of n_ctx cells per slot, plus one per warm prefix. Separate streams
        # (not one unified cache) keep each sequence's cells in the layout a lone sequence
        # has, so attention sums in the same order and greedy outputs match `Llama`'s exactly.
        params.n_ctx = n_ctx * (parallel + prefixes)
        params.n_batch = max(n_batch, parallel)  # one step decodes a token of every slot
        params.n_ubatch = min(params.n_batch, 512)
        params.n_seq_max = parallel + prefixes
        params.kv_unified = False
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.type_k = params.type_v = kv_cache_ggml_type(kv_cache_type)
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if needs_flash_attention(kv_cache_type)
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as `Llama` does
        )
        params.no_perf = True
        try:
            self._ctx = _internals.LlamaContext(model=self._model, params=params, verbose=False)
        except Exception as err:
            message = f"{model_path}: llama.cpp could not create a context ({err})"
            raise ModelFileError(message) from err
        self._memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._batch = _internals.LlamaBatch(
            n_tokens=params.n_batch, embd=0, n_seq_max=1, verbose=False
        )
        self._free = list(range(parallel))
        # What each slot's KV stream still holds from its last request: a new request takes
        # a free slot sharing (nearly) the longest prefix with it (a chat's next turn, a
        # repeated prompt), as llama.cpp's server picks slots, the lowest such (pick_slot).
        self._slot_tokens: dict[int, list[int]] = {slot: [] for slot in range(parallel)}
        self._active: list[_Sequence] = []
        self._n_vocab = self._model.n_vocab()
        self._info = self._chat.info(model_name, gguf_sha256, backend="llama.cpp")

    # -- what the server asks of any backend -------------------------------------------------

    def close(self) -> None:
        self._batch.close()
        self._ctx.close()
        self._chat.close()

    # -- the warm prefix --------------------------------------------------------------------

    @property
    def prefix_tokens(self) -> int:
        return len(self._prefix) + sum(len(tokens) for _, tokens in self._extra)

    def set_prefix(self, tokens: list[int], extra: list[list[int]] | None = None) -> None:
        """The prefix `warm` evaluates, on the thread that steps this engine.

        Every llama.cpp call belongs on that one thread: a second thread that ever computes
        keeps a second OpenMP team alive, and libgomp, managing more threads than CPUs, stops
        spinning at barriers and sleeps instead, a futex wake-up at each of the hundreds of
        barriers in a decode step (3x slower steps on 2 cores, measured).
        """
        self._prefix_pending = list(tokens)
        self._extra_pending = [list(p) for p in extra or []][: len(self._extra_seqs)]

    def warm(self) -> None:
        if self._prefix_pending is not None:
            tokens, self._prefix_pending = self._prefix_pending, None
            self.warm_prefix(tokens)
        pending, self._extra_pending = self._extra_pending, []
        self._extra = [(seq, self._evaluate_into(seq, p))
                       for seq, p in zip(self._extra_seqs, pending, strict=False)]  # fmt: skip

    def warm_prefix(self, tokens: list[int]) -> None:
        """Evaluate a prompt prefix once; requests that start with it copy its KV cells."""
        if self._prefix_seq is None:
            raise ValueError("this engine holds no warm prefix (made with prefixes=0)")
        self._prefix = []
        self._prefix = self._evaluate_into(self._prefix_seq, tokens)
        self._seed_idle_slots()

    def _evaluate_into(self, seq: int, tokens: list[int]) -> list[int]:
        """A reserved sequence holding just `tokens`, evaluated; returns what it holds."""
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
        tokens = tokens[: self._n_ctx - 1]
        done = 0
        while done < len(tokens):
            take = prompt_piece(len(tokens) - done, self._n_batch, at_start=done == 0)
            self._batch.reset()
            for offset, token in enumerate(tokens[done : done + take]):
                self._add(token, done + offset, seq, logits=False)
            self._decode()
            done += take
        return list(tokens)

    def _seed_idle_slots(self) -> None:
        """Copy the warm prefix into every idle slot that lacks it, now rather than at a call.

        Between streams llama.cpp copies a whole stream and then re-plans its compute graph,
        at the next decode: ~10 ms (measured) that would otherwise land in a caller's first
        token.
        """
        import llama_cpp

        if not self._prefix or self._prefix_seq is None:
            return
        seeded = False
        for slot in self._free:
            if not self._holds_prefix(slot):
                llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
                llama_cpp.llama_memory_seq_cp(self._memory, self._prefix_seq, slot, -1, -1)
                self._slot_tokens[slot] = list(self._prefix)
                seeded = True
        if seeded:  # a throwaway token makes llama.cpp do the copies (then it is dropped)
            end = len(self._prefix)
            self._batch.reset()
            self._add(self._prefix[-1], end, self._prefix_seq, logits=False)
            self._decode()
            llama_cpp.llama_memory_seq_rm(self._memory, self._prefix_seq, end, -1)

    def _holds_prefix(self, slot: int) -> bool:
        return common_prefix_length([self._slot_tokens[slot], self._prefix]) == len(self._prefix)

    def clear_cache(self, *, keep_prefix: bool = True) -> None:
        """Forget what idle slots hold beyond the warm prefix (all of it unless keep_prefix)."""
        import llama_cpp

        if not keep_prefix:
            for seq in self._reserved:
                llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
            self._prefix, self._extra = [], []
        for slot in self._free:
            keep = len(self._prefix) if self._holds_prefix(slot) else 0
            llama_cpp.llama_memory_seq_rm(self._memory, slot, keep, -1)
            self._slot_tokens[slot] = self._slot_tokens[slot][:keep]
        self._seed_idle_slots()

    # -- slots --------------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def active(self) -> int:
        return len(self._active)

    def slot_states(self) -> list[SlotState]:
        running = {seq.seq_id: seq for seq in list(self._active)}  # a copy: another thread steps
        return [
            SlotState(slot, True, seq.n_past, seq.prompt_len, seq.produced)
            if (seq := running.get(slot)) is not None
            else SlotState(slot, False, len(self._slot_tokens[slot]))
            for slot in range(self.slots)
        ]

    def start(self, handle: Any, prompt: PreparedPrompt, params: GenerationParams) -> None:
        """Give a request a slot. Its prompt is evaluated by the next steps."""
        import llama_cpp

        if not self._free:
            raise RuntimeError("no free slot")  # the scheduler admits only up to `slots`
        assert prompt.tokens is not None
        tokens = list(prompt.tokens)
        last = len(tokens) - 1  # the last prompt token is always evaluated: its logits start
        reusable = {
            slot: common_prefix_length([self._slot_tokens[slot], tokens]) for slot in self._free
        }
        seq_id = pick_slot(reusable)
        self._free.remove(seq_id)
        kept = usable_cache(reusable[seq_id], last)
        source, prefix = self._best_prefix(tokens)
        shared = usable_cache(common_prefix_length([prefix, tokens]), last)
        if kept >= shared or source is None:
            llama_cpp.llama_memory_seq_rm(self._memory, seq_id, kept, -1)
            cached = kept
        else:
            # Streams are separate, so the copy takes the prefix's whole stream (it holds only
            # the prefix); then whatever this prompt does not share is dropped.
            llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            llama_cpp.llama_memory_seq_cp(self._memory, source, seq_id, -1, -1)
            if shared < len(prefix):
                llama_cpp.llama_memory_seq_rm(self._memory, seq_id, shared, -1)
            cached = shared
        self._slot_tokens[seq_id] = tokens[:cached]
        answer = None
        try:
            if prompt.plan is not None:
                answer = PlannedAnswer(self._model, prompt.plan, params)
            sampler = sampler_chain(self._model, params) if answer is None else None
        except Exception:
            self._free.append(seq_id)
            raise
        self._active.append(
            _Sequence(
                handle=handle,
                seq_id=seq_id,
                prompt_len=len(tokens),
                pending=tokens[cached:],
                n_past=cached,
                params=params,
                sampler=sampler,
                cached=cached,
                buffer=StopStringBuffer(params.stop),
                answer=answer,
            )
        )

    def _best_prefix(self, tokens: list[int]) -> tuple[int | None, list[int]]:
        """The warm prefix sharing the most with a prompt: its sequence and its tokens."""
        if self._prefix_seq is None:
            return None, []
        candidates = [(self._prefix_seq, self._prefix), *self._extra]
        return max(candidates, key=lambda c: common_prefix_length([c[1], tokens]))

    def generate(
        self, prompt: PreparedPrompt, params: GenerationParams, should_stop: Callable[[], bool]
    ) -> Iterator[TokenPiece | Finished]:
        """One request on its own, for callers without a scheduler (evaluation, tools)."""
        handle = object()
        self.start(handle, prompt, params)
        try:
            while True:
                if should_stop():
                    finished = self.cancel(handle)
                    if finished:
                        yield finished
                    return
                for owner, event in self.step():
                    if owner is handle:
                        yield event
                        if isinstance(event, Finished):
                            return
        finally:
            self.cancel(handle)  # a no-op unless the caller stopped iterating early

    def cancel(self, handle: Any) -> Finished | None:
        """Free a request's slot at once; its Finished(cancelled), or None if not active."""
        for sequence in self._active:
            if sequence.handle is handle:
                return self._finish(sequence, "cancelled")
        return None

    def step(self) -> list[tuple[Any, TokenPiece | Finished]]:
        """One decoding row for every running request, then up to n_batch prompt tokens."""
        events: list[tuple[Any, TokenPiece | Finished]] = []
        # A decoding row is one sampled token; forced tokens after it go as a prompt piece.
        decoding = [s for s in self._active if s.n_past >= s.prompt_len and len(s.pending) == 1]
        prompts = [s for s in self._active if s not in decoding]
        if decoding:
            self._batch.reset()
            for sequence in decoding:
                self._feed(sequence, len(sequence.pending))
            self._decode_or_forget()
            for sequence in decoding:
                events += [(sequence.handle, e) for e in self._advance(sequence)]
        # A joining prompt takes a bounded share of the step, so the streams already running
        # never stall for long; each piece goes in a call of its own (see the module's note).
        budget = self._n_batch
        for sequence in prompts:
            take = prompt_piece(len(sequence.pending), budget, at_start=sequence.n_past == 0)
            if take == 0:
                break
            self._batch.reset()
            self._feed(sequence, take)
            self._decode_or_forget()
            budget -= take
            if not sequence.pending:
                events += [(sequence.handle, e) for e in self._advance(sequence)]
        return events

    # -- internals ----------------------------------------------------------------------------

    def _feed(self, sequence: _Sequence, take: int) -> None:
        """Put the sequence's next `take` pending tokens in the batch (logits for the last)."""
        chunk = sequence.pending[:take]
        last = take == len(sequence.pending)
        for offset, token in enumerate(chunk):
            wants_logits = last and offset == take - 1
            if wants_logits:
                sequence.logits_index = self._batch.n_tokens()
            self._add(token, sequence.n_past + offset, sequence.seq_id, wants_logits)
        sequence.pending = sequence.pending[take:]
        sequence.n_past += take
        self._slot_tokens[sequence.seq_id].extend(chunk)

    def _decode_or_forget(self) -> None:
        import llama_cpp

        try:
            self._decode()
        except BackendError:
            for sequence in self._active:  # their KV is in doubt: reuse none of it
                self._slot_tokens[sequence.seq_id] = []
                llama_cpp.llama_memory_seq_rm(self._memory, sequence.seq_id, -1, -1)
            raise

    def _add(self, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch = self._batch.batch
        i = batch.n_tokens
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits
        batch.n_tokens = i + 1

    def _decode(self) -> None:
        import llama_cpp

        code = llama_cpp.llama_decode(self._ctx.ctx, self._batch.batch)
        if code != 0:
            # Sizing makes a full KV cache impossible; anything else is llama.cpp failing.
            raise BackendError(f"llama_decode returned {code}")

    def _advance(self, sequence: _Sequence) -> list[TokenPiece | Finished]:
        """Sample the sequence's next token from this step's logits and apply its limits."""
        import llama_cpp

        if sequence.answer is not None:
            return self._advance_planned(sequence, sequence.answer)
        token = int(sequence.sampler.sample(self._ctx, sequence.logits_index))
        if llama_cpp.llama_vocab_is_eog(self._model.vocab, token):
            return [self._finish(sequence, "stop")]
        sequence.produced += 1
        fed = sequence.buffer.feed(self._model.detokenize([token]))
        piece = logprob_piece(fed, sequence.buffer, self._ctx.ctx, sequence.logits_index,
                              self._n_vocab, token, sequence.params,
                              self._model.detokenize)  # fmt: skip
        events: list[TokenPiece | Finished] = [piece]
        if sequence.buffer.stopped:
            events.append(self._finish(sequence, "stop_sequence"))
        elif (
            sequence.produced >= sequence.params.max_tokens
            or sequence.prompt_len + sequence.produced >= self._n_ctx
        ):
            events.append(self._finish(sequence, "length"))
        else:
            sequence.pending = [token]
        return events

    def _advance_planned(
        self, sequence: _Sequence, answer: PlannedAnswer
    ) -> list[TokenPiece | Finished]:
        """Typed decoding: sample a value token; what the plan forces after it is fed next."""
        token, step, logprob = answer.sample(self._ctx, sequence.logits_index)
        sequence.produced = answer.steps
        events: list[TokenPiece | Finished] = [answer.piece(step.text, logprob)]
        if step.done:
            events.append(self._finish(sequence, "stop"))
        elif (
            answer.steps >= sequence.params.max_tokens
            or sequence.n_past + 1 + len(step.forced) >= self._n_ctx
        ):
            events.append(self._finish(sequence, "length"))
        else:
            sequence.pending = [token, *step.forced]
        return events

    def _finish(self, sequence: _Sequence, reason: FinishReason) -> Finished:
        self._active.remove(sequence)
        self._free.append(sequence.seq_id)
        if sequence.answer is not None:
            sequence.answer.close()
            return sequence.answer.finished(reason, sequence.prompt_len, sequence.cached)
        sequence.sampler.close()
        return Finished(
            reason=reason,
            prompt_tokens=sequence.prompt_len,
            completion_tokens=sequence.produced,
            cached_prompt_tokens=sequence.cached,
            text=sequence.buffer.flush() if reason != "cancelled" else "",
            stop_sequence=sequence.buffer.stopped_by,
        )


SLOT_REUSE_SLACK = 32


def pick_slot(reusable: dict[int, int]) -> int:
    """The free slot for a new request, given the tokens each could reuse: the lowest-numbered
    one reusing within SLOT_REUSE_SLACK tokens of the best.

    A decode step attends over every KV stream from its lowest to its highest slot, idle ones
    included, so packed slots decode faster (8 running on slots 0-7 vs spread over 0-15: 2x
    the tokens/s, measured); a few reused prompt tokens are worth less than that.
    """
    best = max(reusable.values())
    return min(slot for slot, reuse in reusable.items() if reuse >= best - SLOT_REUSE_SLACK)


def prompt_piece(pending: int, budget: int, *, at_start: bool) -> int:
    """How many of a prompt's `pending` tokens to evaluate now, with room for `budget`.

    Never a one-token piece after position 0, and never a one-token remainder.
    """
    take = min(pending, budget)
    if pending - take == 1:
        take -= 1
    if take == 1 and not (at_start or pending == 1):
        return 0
    return take
