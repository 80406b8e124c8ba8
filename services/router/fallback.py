"""The API model: the teacher program (the bundle's signature) on a DSPy model string."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import SecretStr

from services.core.api import pb
from services.core.lm_connection import connection, litellm_connection
from services.core.pipeline import (
    LmCall,
    PipelineSpec,
    ProgramRunner,
    call_temperature,
    exception_chain,
)
from services.core.predict_stream import Deltas, Emit
from services.core.program import ProgramSpec, PromptCodec, typed_json, value_text
from services.core.sampling import GenerationParams

# Air-gapped hosts: LiteLLM would otherwise try to download its price list when first imported
# (three attempts, ~10 s) before the router could start.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

log = logging.getLogger(__name__)
T = TypeVar("T")


class ApiError(Exception):
    """The API call failed after retries; `kind` is "timeout" or "error"."""

    def __init__(self, kind: str, message: str, attempts: int = 1) -> None:
        super().__init__(message)
        self.kind = kind
        self.attempts = attempts

    @property
    def summary(self) -> str:
        """The error's first line, short enough for a client's status message."""
        line = str(self).strip().splitlines()[0] if str(self).strip() else self.kind
        return line if len(line) <= 160 else line[:157] + "..."


@dataclass(frozen=True)
class Generated:
    """How the API model's answer to a Generate call ended."""

    finished_by_length: bool
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ApiAnswer:
    """The API model's answer to a Predict: the outputs as text and typed (program.typed_json,
    as a runtime answers), and its calls, each with the tokens the API counted."""

    outputs: dict[str, str]
    outputs_json: str
    calls: tuple[LmCall, ...]


@dataclass(frozen=True)
class Piece:
    """A piece of a streamed Generate: new text (with its tokens' log-probabilities when
    asked for), or (the last piece) how it ended."""

    text: str
    final: Generated | None = None
    logprobs: tuple[pb.GeneratedTokenLogprob, ...] = ()


class FallbackModel:
    def __init__(
        self,
        program: ProgramSpec | PipelineSpec,
        *,
        program_path: Path,
        model: str,
        api_base: str | None,
        api_key: SecretStr | None,
        timeout_s: float,
        retries: int,
        backoff_s: float,
    ) -> None:
        import dspy
        import litellm

        litellm.suppress_debug_info = True
        for name in ("LiteLLM", "litellm", "httpx", "openai"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.model = model
        self._key = api_key
        self._timeout_s = timeout_s
        self._retries = retries
        self._backoff_s = backoff_s
        self._output_names = [f.name for f in program.outputs]
        self._name = program.name
        kwargs: dict[str, Any] = {
            "cache": False,  # DSPy's cache key ignores api_base
            "num_retries": 0,  # retries are ours, with backoff and a breaker
            "timeout": timeout_s,
            "temperature": 0.0,
        }
        key = None if api_key is None else api_key.get_secret_value()
        kwargs.update(connection(model, api_base, key))
        self._lm = dspy.LM(model, **kwargs)
        self._stream_kwargs = {
            "num_retries": 0, "timeout": timeout_s, "stream_options": {"include_usage": True},
            **litellm_connection(model, api_base, key),
        }  # fmt: skip
        self._runner: ProgramRunner | None = None
        if isinstance(program, PipelineSpec):
            # The whole program runs on the API model, each predictor prompted as served.
            self._runner = ProgramRunner.load(program_path, program)
        else:
            self._codec = PromptCodec(program)
            self._predictor = dspy.Predict(self._codec.signature)
            self._predictor.demos = [dspy.Example(**demo) for demo in program.demos]
            self._predictor.set_lm(self._lm)

    def _redact(self, text: str) -> str:
        if self._key is not None:
            secret = self._key.get_secret_value()
            if secret:
                text = text.replace(secret, "[redacted]")
        return text

    def _call(self, inputs: dict[str, str], emit: Emit | None = None) -> ApiAnswer:
        if emit is not None:
            return self._streamed_call(inputs, emit)
        if self._runner is not None:
            result = self._runner.run(inputs, self._api_call)
            if result.outputs is None:
                raise UnparsedAnswer(f"the API model's answer did not parse ({result.outcome})")
            return ApiAnswer(result.outputs, result.outputs_json, tuple(result.calls))
        from dspy.utils.usage_tracker import track_usage

        with track_usage() as used:
            prediction = self._predictor(**self._codec.decode_inputs(inputs))  # typed, as served
        values = {name: prediction.get(name, "") for name in self._output_names}
        texts = {name: value_text(value) for name, value in values.items()}
        call = LmCall(self._name, "", 1.0, "parsed", **counted_tokens(used))
        return ApiAnswer(texts, typed_json(values, self._output_names), (call,))

    def _streamed_call(self, inputs: dict[str, str], emit: Emit) -> ApiAnswer:
        """The answer as `_call` gives it, each output value handed to `emit` as the API
        writes it (a multi-step program's steps' values too)."""
        if self._runner is not None:
            runner = self._runner

            def complete(predictor: str, messages: list[dict[str, str]]) -> LmCall:
                outputs = runner.codecs[predictor].output_names
                return self._streamed_completion(predictor, outputs, messages, emit)

            result = runner.run(inputs, complete)
            if result.outputs is None:
                raise UnparsedAnswer(f"the API model's answer did not parse ({result.outcome})")
            return ApiAnswer(result.outputs, result.outputs_json, tuple(result.calls))
        messages = self._codec.format_messages(inputs)
        call = self._streamed_completion(self._name, self._output_names, messages, emit)
        parsed = self._codec.parse(call.text)
        if parsed is None:
            raise UnparsedAnswer(f"the API model's answer did not parse: {call.text[:200]!r}")
        values = {name: parsed.values[name] for name in self._output_names}
        texts = {name: value_text(value) for name, value in values.items()}
        return ApiAnswer(texts, typed_json(values, self._output_names), (call,))

    def _streamed_completion(
        self, predictor: str, outputs: list[str], messages: list[dict[str, str]], emit: Emit
    ) -> LmCall:
        """One chat call streamed, as DSPy's LM would make it (temperature 0, its token
        limit), its output values handed to `emit` as they come."""
        import litellm

        deltas = Deltas(predictor, outputs, emit, served_by=pb.SERVED_BY_FALLBACK)
        limit = self._lm.kwargs.get("max_tokens") or self._lm.kwargs.get("max_completion_tokens")
        temperature = call_temperature()  # BestOfN's attempts: 1.0
        reply = litellm.completion(
            model=self.model, messages=messages, stream=True,
            temperature=0.0 if temperature is None else temperature,
            **({"max_tokens": limit} if limit else {}), **self._stream_kwargs,
        )  # fmt: skip
        text, read = [], StreamedChunks()
        for chunk in reply:
            if piece := read.text(chunk):
                text.append(piece)
                deltas.text(piece)
        deltas.close()
        return LmCall(predictor=predictor, text="".join(text), confidence=1.0, outcome="parsed",
                      **read.tokens())  # fmt: skip

    def _api_call(self, predictor: str, messages: list[dict[str, str]]) -> LmCall:
        from dspy.utils.usage_tracker import track_usage

        temperature = call_temperature()  # the program's for this call (BestOfN's attempts)
        asked = {} if temperature is None else {"temperature": temperature}
        with track_usage() as used:
            text = str(self._lm(messages=messages, **asked)[0])
        return LmCall(predictor=predictor, text=text, confidence=1.0, outcome="parsed",
                      **counted_tokens(used))  # fmt: skip

    def _options(self, params: GenerationParams, seed: int | None) -> dict[str, Any]:
        """A Generate call's options as an OpenAI-style API takes them (llama.cpp's top_k,
        min_p and repeat_penalty are the local sampler's: not sent; OpenAI's frequency and
        presence penalties are)."""
        options: dict[str, Any] = {
            "max_tokens": params.max_tokens, "temperature": params.temperature,
            "top_p": params.top_p,
        }  # fmt: skip
        for name in ("frequency_penalty", "presence_penalty"):  # OpenAI's own: sent when set
            if getattr(params, name):
                options[name] = getattr(params, name)
        if params.logprobs:
            options["logprobs"] = True
            options["top_logprobs"] = params.top_logprobs
        if params.stop:
            options["stop"] = list(params.stop)
        if seed is not None:
            options["seed"] = seed
        if params.json_schema:
            schema = json.loads(params.json_schema)
            options["response_format"] = {
                "type": "json_schema", "json_schema": {"name": "answer", "schema": schema}
            }  # fmt: skip
        return options

    async def _stream_once(
        self, messages: list[dict[str, str]], options: dict[str, Any]
    ) -> AsyncIterator[Piece]:
        """One streamed chat call: its text pieces as they arrive, then the summary. LiteLLM's
        own call, not DSPy's: DSPy 3.4 sends the limit as `max_completion_tokens`, which
        servers such as llama-cpp-python's ignore, and a Generate's limit is a contract."""
        import litellm

        reply = await asyncio.wait_for(litellm.acompletion(
            model=self.model, messages=messages, stream=True, **self._stream_kwargs, **options,
        ), self._timeout_s)  # fmt: skip
        async with reply:  # closed however it ends: a client that left stops the API's answer
            pieces, read = reply.__aiter__(), StreamedChunks()
            while True:
                try:  # the wait for each piece is bounded, not the whole generation
                    chunk = await asyncio.wait_for(anext(pieces), self._timeout_s)
                except StopAsyncIteration:
                    break
                if text := read.text(chunk):
                    listed = api_logprobs(chunk.choices[0]) if "logprobs" in options else ()
                    if "logprobs" in options and not listed:
                        raise NoLogprobs(f"{self.model} answered without log-probabilities")
                    yield Piece(text=text, logprobs=listed)
        yield Piece(text="", final=Generated(finished_by_length=read.finish == "length",
                                             **read.tokens()))  # fmt: skip

    async def predict(
        self, inputs: dict[str, str], emit: Emit | None = None
    ) -> tuple[ApiAnswer, float]:
        """The API's answer and the seconds it took; ApiError after the last retry. With
        `emit`, its output values go there as the API writes them (from a worker thread), and
        a call is retried only while nothing has gone out."""
        outbox = None if emit is None else Outbox(emit)
        return await self._retrying(self._call, inputs, outbox=outbox)

    async def stream(
        self, messages: list[dict[str, str]], params: GenerationParams, seed: int | None
    ) -> AsyncIterator[Piece]:
        """A Generate call answered by the API model, streamed: its text pieces, then a piece
        with `final` set. Retried while nothing was sent; ApiError after the last retry or
        when it fails once text has gone out."""
        options = self._options(params, seed)
        for attempt in range(self._retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff_s * 2 ** (attempt - 1))
            sent = False
            try:
                async for piece in self._stream_once(messages, options):
                    sent = True
                    yield piece
                return
            except Exception as err:
                failure, again = self._failure(err, attempt, again_if=not sent)
                if not again:
                    raise failure from None

    async def _retrying(
        self, call: Callable[..., T], *args: Any, outbox: Outbox | None = None
    ) -> tuple[T, float]:
        """`call(*args)` in a thread (with the attempt's emit last when streamed), retried
        as `_failure` says; a streamed call only while it has sent nothing."""
        for attempt in range(self._retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff_s * 2 ** (attempt - 1))
            started = time.perf_counter()
            streamed = () if outbox is None else (outbox.next_attempt(),)
            try:
                answer = await asyncio.wait_for(
                    asyncio.to_thread(call, *args, *streamed), self._timeout_s
                )
                return answer, time.perf_counter() - started
            except Exception as err:
                sent = outbox is not None and outbox.end_attempt()
                failure, again = self._failure(err, attempt, again_if=not sent)
                if not again:
                    raise failure from None
        raise AssertionError("unreachable: the last attempt raises")

    def _failure(
        self, err: Exception, attempt: int, again_if: bool = True
    ) -> tuple[ApiError, bool]:
        """An attempt's error as an ApiError (any provider error: counted, maybe retried, never
        leaked), and whether to try again."""
        if timed_out(err):
            failure, again = ApiError("timeout", f"no answer within {self._timeout_s} s"), True
        else:
            failure = ApiError("error", self._redact(f"{type(err).__name__}: {err}")[:300])
            again = retryable(err)
        failure.attempts = attempt + 1
        again = again and again_if and attempt < self._retries
        log.warning(
            "fallback API call failed",
            extra={"attempt": attempt + 1, "kind": failure.kind, "error": str(failure),
                   "retried": again},
        )  # fmt: skip
        return failure, again


class Outbox:
    """A streamed API call's deltas across its attempts: only the current attempt's pass (a
    thread that timed out may still be writing when the next attempt starts)."""

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self._lock = threading.Lock()
        self._current = 0
        self._sent = False

    def next_attempt(self) -> Emit:
        with self._lock:
            self._current += 1
            attempt = self._current

        def emit(delta: pb.OutputDelta) -> None:
            with self._lock:
                if self._current == attempt:
                    self._sent = True
                    self._emit(delta)

        return emit

    def end_attempt(self) -> bool:
        """Stop the current attempt's deltas; whether any has gone out so far."""
        with self._lock:
            self._current += 1
            return self._sent


class StreamedChunks:
    """A LiteLLM stream read chunk by chunk: each one's text; by the end, why the answer
    stopped and the tokens its last `usage` counted (0 when the API sent none)."""

    def __init__(self) -> None:
        self.finish: str | None = None
        self._usage: Any = None

    def text(self, chunk: Any) -> str:
        self._usage = getattr(chunk, "usage", None) or self._usage
        if not chunk.choices:  # the usage-only chunk at the end
            return ""
        self.finish = chunk.choices[0].finish_reason or self.finish
        return chunk.choices[0].delta.content or ""

    def tokens(self) -> dict[str, int]:
        return {kind: int(getattr(self._usage, kind, 0) or 0)
                for kind in ("prompt_tokens", "completion_tokens")}  # fmt: skip


def counted_tokens(tracker: Any) -> dict[str, int]:
    """The prompt and completion tokens a DSPy usage tracker holds, as the API counted them
    (LiteLLM's estimate where the server sends none)."""
    totals = tracker.get_total_tokens().values()
    return {kind: sum(int(usage.get(kind) or 0) for usage in totals)
            for kind in ("prompt_tokens", "completion_tokens")}  # fmt: skip


def timed_out(err: BaseException) -> bool:
    """Whether the error, or one that caused it, is a timeout: ours, or the LM client's own
    read timeout (set to the same limit), which arrives wrapped in its transport error."""
    from dspy.utils import exceptions as lm

    return any(isinstance(e, TimeoutError | lm.LMTimeoutError) for e in exception_chain(err))


def retryable(err: Exception) -> bool:
    """Whether the same call could succeed again: not when the answer did not parse (the API
    is asked at temperature 0, it would answer alike) or the request, key or billing was
    refused; yes for a dropped connection, a rate limit, a provider timeout or server error."""
    import litellm
    from dspy.utils import exceptions as lm

    refused = (lm.LMAuthError, lm.LMBillingError, lm.LMInvalidRequestError,
               lm.LMConfigurationError, lm.AdapterParseError, UnparsedAnswer, NoLogprobs,
               # LiteLLM's own, from the streamed Generate
               litellm.AuthenticationError, litellm.PermissionDeniedError,
               litellm.BadRequestError, litellm.NotFoundError,
               litellm.UnprocessableEntityError)  # fmt: skip
    return not isinstance(err, refused)


class UnparsedAnswer(ValueError):
    """A multi-step program's API answer that did not parse."""


class NoLogprobs(ValueError):
    """The API model does not give the log-probabilities a Generate asked for."""


def api_logprobs(choice: Any) -> tuple[pb.GeneratedTokenLogprob, ...]:
    """A streamed choice's `logprobs.content` (OpenAI's shape) as the proto's."""
    content = getattr(getattr(choice, "logprobs", None), "content", None) or []

    def token(entry: Any) -> pb.TokenLogprob:
        text = str(_get(entry, "token") or "")
        raw = _get(entry, "bytes")
        return pb.TokenLogprob(token=text, logprob=float(_get(entry, "logprob") or 0.0),
                               bytes=bytes(raw) if raw else text.encode())  # fmt: skip

    return tuple(
        pb.GeneratedTokenLogprob(token=token(entry),
                                 top_logprobs=[token(t) for t in _get(entry, "top_logprobs") or []])
        for entry in content
    )  # fmt: skip


def _get(entry: Any, name: str) -> Any:
    """A field of LiteLLM's logprob objects, or of the plain dicts some providers give."""
    return entry.get(name) if isinstance(entry, dict) else getattr(entry, name, None)
