"""The runtime's gRPC server: `edgedistill.v1.Inference` + health + reflection + metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2

from services.core import predict_stream, security, serving
from services.core import validation as check
from services.core.api import SERVICE_NAME, pb, pb_grpc
from services.core.config import RuntimeSettings
from services.core.model_info import describe_program
from services.core.pipeline import LmCall, ProgramFailed, ProgramRunner, call_temperature
from services.core.predict_stream import Deltas, Emit
from services.core.program import COMPLETED_MARKER, PromptCodec
from services.core.rpc_status import call_status
from services.core.sampling import (
    GENERATE_DEFAULT_TEMPERATURE,
    PREDICT_DEFAULT_TEMPERATURE,
    GenerationParams,
)
from services.core.usage import usage_of
from services.core.validation import Limits, RpcFailure
from services.runtime.backends import (
    Backend,
    BackendError,
    BatchingBackend,
    Finished,
    KeepsPrefixes,
    TokenPiece,
)
from services.runtime.backends.base import EmbeddingBackend, PreparedPrompt
from services.runtime.backends.embeddings import Embedded, EmbeddingCancelled
from services.runtime.loading import LoadedModel, load_model
from services.runtime.logprobs import ShownLogprobs
from services.runtime.metrics import RuntimeMetrics
from services.runtime.predict import interpret, lm_call, prepare_answer
from services.runtime.scheduler import Job, QueueFull, Scheduler, SchedulerClosed, make_scheduler
from services.runtime.tokenizing import detokenized, logit_bias, tokenized

log = logging.getLogger(__name__)

_OUTCOME = {
    "parsed": pb.PREDICT_OUTCOME_PARSED,
    "unparsed": pb.PREDICT_OUTCOME_UNPARSED,
    "truncated": pb.PREDICT_OUTCOME_TRUNCATED,
}
_FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "stop_sequence": pb.FINISH_REASON_STOP_SEQUENCE,
}
R = TypeVar("R")
S = TypeVar("S")


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, settings: RuntimeSettings, metrics: RuntimeMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._model: LoadedModel | None = None
        self._scheduler: Scheduler | None = None
        self._limits: Limits | None = None
        self._program_pool: ThreadPoolExecutor | None = None
        self._embed_calls = 0  # Embed calls waiting for or running on the model's thread

    def attach(self, model: LoadedModel) -> None:
        self._model = model
        self._scheduler = make_scheduler(model.backend, self._settings.max_queue)
        # Programs wait on their LM calls in these threads: one per call the scheduler admits.
        self._program_pool = ThreadPoolExecutor(
            self._settings.max_queue + self._scheduler.slots, thread_name_prefix="program"
        )
        self._limits = Limits(
            max_tokens_default=self._settings.max_tokens_default,
            max_tokens_limit=self._settings.max_tokens_limit,
            max_request_bytes=self._settings.max_request_bytes,
            context_length=model.backend.info.context_length,
        )

    def wait_ready(self) -> None:
        assert self._scheduler is not None
        self._scheduler.wait_ready()

    def close(self) -> None:
        if self._program_pool:
            self._program_pool.shutdown(wait=False, cancel_futures=True)
        if self._scheduler:
            self._scheduler.close(timeout=5)
        if self._model:
            self._model.backend.close()

    # -- RPCs ---------------------------------------------------------------------------------

    async def Predict(self, request: pb.PredictRequest, context: Any) -> pb.PredictResponse:
        return await self._unary("Predict", self._predict, request, context)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Any) -> pb.ModelInfo:
        return await self._unary("GetModelInfo", self._model_info, request, context)

    async def Tokenize(self, request: pb.TokenizeRequest, context: Any) -> pb.TokenizeResponse:
        return await self._unary("Tokenize", self._tokenize, request, context)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: Any
    ) -> pb.DetokenizeResponse:
        return await self._unary("Detokenize", self._detokenize, request, context)

    async def Embed(self, request: pb.EmbedRequest, context: Any) -> pb.EmbedResponse:
        return await self._unary("Embed", self._embed, request, context)

    def Generate(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateChunk]:
        started = time.perf_counter()
        return self._streamed("Generate", self._generate(request, context, started), context)

    def PredictStream(
        self, request: pb.PredictRequest, context: Any
    ) -> AsyncIterator[pb.PredictChunk]:
        sent: asyncio.Queue[pb.PredictChunk] = asyncio.Queue()
        answer = self._predict(
            request, context, emit=lambda delta: sent.put_nowait(pb.PredictChunk(delta=delta))
        )
        return self._streamed("PredictStream", predict_stream.chunks(answer, sent), context)

    # -- implementations ----------------------------------------------------------------------

    async def _predict(
        self, request: pb.PredictRequest, context: Any, emit: Emit | None = None
    ) -> pb.PredictResponse:
        """The program's answer; with `emit`, its output values' text as it is written."""
        started = time.perf_counter()
        model, scheduler, limits = self._ready()
        check.check_size(request, limits.max_request_bytes)
        codec, runner = model.program.codec, model.program.runner
        if runner is not None:
            return await self._run_program(runner, request, context, started, emit)
        if codec is None:
            raise RpcFailure(
                grpc.StatusCode.FAILED_PRECONDITION,
                "no program is loaded; serve with --bundle DIR or --model X --program program.json",
            )
        inputs = check.predict_inputs(request, codec.spec.inputs)
        params = _predict_params(request, limits)
        prompt = self._prepare(codec, codec.format_messages(inputs))
        n_prompt = len(prompt.tokens) if prompt.tokens is not None else None
        longest = check.longest_input(inputs)
        check.fits_context(n_prompt, params.max_tokens, limits.context_length, longest)
        if self._settings.log_requests:
            log.info("predict request", extra={"inputs": inputs})

        job = self._submit(scheduler, prompt, params, context)
        deltas = _deltas(codec, codec.spec.name, emit)
        text, pieces, finished, first_token_at = await self._drain(job, context, deltas)
        raw = text + finished.text
        result = interpret(codec, raw, pieces, finished)
        response = pb.PredictResponse(
            served_by=pb.SERVED_BY_LOCAL,
            model_id=model.backend.info.model_name,
            usage=usage_of(finished),
            queue_ms=_queue_ms(job),
            confidence=result.confidence,
            outcome=_OUTCOME[result.outcome],
        )
        response.lm_calls.add(
            predictor=codec.spec.name, usage=usage_of(finished), confidence=result.confidence
        )
        if result.outputs is not None:
            response.outputs.update(result.outputs)
            response.outputs_json = result.outputs_json
        if result.outputs is None or request.include_raw_text:
            response.raw_text = raw
        self._metrics.predict_outcomes.labels(pb.PredictOutcome.Name(response.outcome)).inc()
        if first_token_at is not None:
            self._metrics.time_to_first_token.labels("Predict").observe(first_token_at - started)
        response.latency_ms = (time.perf_counter() - started) * 1000
        if self._settings.log_requests:
            log.info("predict response", extra={"outputs": dict(response.outputs), "raw": raw})
        return response

    async def _run_program(
        self, runner: ProgramRunner, request: pb.PredictRequest, context: Any, started: float,
        emit: Emit | None,
    ) -> pb.PredictResponse:  # fmt: skip
        """A multi-step program's `forward`, on a worker thread; each predictor call goes
        through the scheduler like any Predict (batched, deadline and cancellation kept)."""
        model, _, limits = self._ready()
        inputs = check.predict_inputs(request, runner.spec.inputs)
        params = _predict_params(request, limits)
        if self._settings.log_requests:
            log.info("predict request", extra={"inputs": inputs})
        assert self._program_pool is not None  # attach() made it with the scheduler
        loop = asyncio.get_running_loop()
        longest = check.longest_input(inputs)  # named when a call's prompt is too long
        calls = ProgramCalls(loop, params, lambda name, messages, call_params: self._program_call(
            runner, name, messages, call_params, context, emit, longest))  # fmt: skip
        try:
            result = await loop.run_in_executor(self._program_pool, runner.run, inputs, calls)
        except ProgramFailed as failed:
            raise RpcFailure(
                grpc.StatusCode.INTERNAL, f"the program raised {failed}"[:1000]
            ) from failed
        finally:
            calls.cancel()
        response = pb.PredictResponse(
            served_by=pb.SERVED_BY_LOCAL, model_id=model.backend.info.model_name,
            confidence=result.confidence, outcome=_OUTCOME[result.outcome],
            queue_ms=calls.queue_ms,
        )  # fmt: skip
        for call in result.calls:
            response.lm_calls.add(predictor=call.predictor, confidence=call.confidence,
                                  usage=usage_of(call))  # fmt: skip
        response.usage.CopyFrom(usage_of(*result.calls))
        if result.outputs is not None:
            response.outputs.update(result.outputs)
            response.outputs_json = result.outputs_json
        if result.outputs is None or request.include_raw_text:
            response.raw_text = result.raw_text
        self._metrics.predict_outcomes.labels(pb.PredictOutcome.Name(response.outcome)).inc()
        response.latency_ms = (time.perf_counter() - started) * 1000
        return response

    async def _program_call(
        self, runner: ProgramRunner, name: str, messages: list[dict[str, str]],
        params: Any, context: Any, emit: Emit | None, longest: str,
    ) -> tuple[LmCall, float]:  # fmt: skip
        """One predictor call of a running program, on the event loop."""
        _, scheduler, limits = self._ready()
        prompt = self._prepare(runner.codecs[name], messages)
        n_prompt = len(prompt.tokens) if prompt.tokens is not None else None
        check.fits_context(n_prompt, params.max_tokens, limits.context_length, longest)
        job = self._submit(scheduler, prompt, params, context)
        deltas = _deltas(runner.codecs[name], name, emit)
        text, pieces, finished, _ = await self._drain(job, context, deltas)
        raw = text + finished.text
        call = lm_call(name, raw, interpret(runner.codecs[name], raw, pieces, finished), finished)
        return call, _queue_ms(job)

    async def _generate(
        self, request: pb.GenerateRequest, context: Any, started: float
    ) -> AsyncIterator[pb.GenerateChunk]:
        model, scheduler, limits = self._ready()
        check.check_size(request, limits.max_request_bytes)
        text = check.raw_prompt(request)
        messages = check.chat_messages(request) if text is None else []
        stop = check.stop_strings(request)
        schema, grammar = check.output_constraint(request)
        _check_constraint(model.backend, schema, grammar)
        params = check.sampling_params(
            request.options,
            limits,
            default_temperature=GENERATE_DEFAULT_TEMPERATURE,
            stop=stop,
            json_schema=schema,
            grammar=grammar,
            logit_bias=logit_bias(model.backend, request),
            **check.logprob_request(request),
        )
        prompt = self._prepare_generate(model.backend, messages, text)
        n_prompt = len(prompt.tokens) if prompt.tokens is not None else None
        field = "messages" if text is None else "prompt"
        check.fits_context(n_prompt, params.max_tokens, limits.context_length, field)
        if self._settings.log_requests:
            log.info("generate request", extra={"messages": messages, "prompt": text})

        job = self._submit(scheduler, prompt, params, context)
        first_token_at: float | None = None
        logprobs = ShownLogprobs()
        try:
            async for event in job.events():
                if isinstance(event, TokenPiece):
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    logprobs.add(event)
                    if event.text:
                        yield pb.GenerateChunk(text=event.text, logprobs=logprobs.shown(event.text))
                    continue
                self._finish_or_fail(event, job, context)
                self._count_tokens(event)
                now = time.perf_counter()
                ttft = (first_token_at or now) - started
                self._metrics.time_to_first_token.labels("Generate").observe(ttft)
                yield pb.GenerateChunk(
                    text=event.text,
                    finish_reason=_FINISH[event.reason],
                    usage=usage_of(event),
                    latency_ms=(now - started) * 1000,
                    time_to_first_token_ms=ttft * 1000,
                    served_by=pb.SERVED_BY_LOCAL,
                    model_id=model.backend.info.model_name,
                    logprobs=logprobs.shown(event.text, last=True),
                    stop_sequence=event.stop_sequence,
                )
        except BackendError as err:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, f"model backend failed: {err}") from err
        finally:
            job.cancel()  # no-op when finished; stops generation when the client went away

    async def _tokenize(self, request: pb.TokenizeRequest, context: Any) -> pb.TokenizeResponse:
        model, _, limits = self._ready()
        check.check_size(request, limits.max_request_bytes)
        return tokenized(model.backend, request, limits.context_length)

    async def _detokenize(
        self, request: pb.DetokenizeRequest, context: Any
    ) -> pb.DetokenizeResponse:
        model, _, _ = self._ready()
        return detokenized(model.backend, request)

    async def _embed(self, request: pb.EmbedRequest, context: Any) -> pb.EmbedResponse:
        model, scheduler, limits = self._ready()
        check.check_size(request, limits.max_request_bytes)
        texts = check.embed_inputs(request)
        backend = model.backend
        if not isinstance(backend, EmbeddingBackend):
            raise RpcFailure(grpc.StatusCode.UNIMPLEMENTED,
                             f"the {backend.info.backend} backend does not embed")  # fmt: skip
        embedded = await self._embedded(scheduler, backend, request, texts, context)
        read = sum(item.tokens for item in embedded)
        self._metrics.tokens.labels("prompt").inc(read)
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=item.values.tolist(), tokens=item.tokens,
                                     truncated=item.truncated) for item in embedded],
            usage=pb.Usage(prompt_tokens=read), model_id=backend.info.model_name,
            pooling=backend.pooling,
        )  # fmt: skip

    async def _embedded(
        self, scheduler: Scheduler, backend: EmbeddingBackend, request: pb.EmbedRequest,
        texts: list[str], context: Any,
    ) -> list[Embedded]:  # fmt: skip
        """The texts embedded on the model's thread, a decode at a time between generation
        steps; at most max_queue + 1 calls at once; stopped between two decodes once the
        client went away or the deadline passed."""
        if self._embed_calls > self._settings.max_queue:
            raise RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy: "
                             f"{self._embed_calls} embedding calls are waiting")  # fmt: skip
        normalize = request.normalize if request.HasField("normalize") else True
        stop = _Stop(_deadline(context))
        self._embed_calls += 1
        try:
            steps = backend.embed(texts, truncate=request.truncate, normalize=normalize,
                                  should_stop=stop)  # fmt: skip
            done: list[Embedded] = await asyncio.wrap_future(scheduler.submit_steps(steps))
            return done
        except SchedulerClosed as err:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, str(err)) from err
        except ValueError as err:  # "inputs[i]: what is wrong"
            field, _, why = str(err).partition(": ")
            raise check.invalid(field, why) from None
        except EmbeddingCancelled:
            raise stop.failure() from None
        except NotImplementedError as err:  # "field: what the backend does not serve"
            raise RpcFailure(grpc.StatusCode.UNIMPLEMENTED, str(err)) from None
        except BackendError as err:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, f"model backend failed: {err}") from err
        finally:
            self._embed_calls -= 1
            stop.set()  # the client went away: the texts not yet embedded are not

    async def _model_info(self, request: pb.GetModelInfoRequest, context: Any) -> pb.ModelInfo:
        model, scheduler, limits = self._ready()
        info = model.backend.info
        reply = pb.ModelInfo(
            model_name=info.model_name,
            gguf_sha256=info.gguf_sha256,
            quantization=info.quantization,
            context_length=info.context_length,
            trained_context_length=info.trained_context_length,
            bundle_version=model.bundle_version,
            backend=info.backend,
            max_tokens_limit=limits.max_tokens_limit,
            max_tokens_default=limits.max_tokens_default,
            parallel=1,
            chat_template=info.chat_template,
            bos_token=info.bos_token,
            eos_token=info.eos_token,
        )
        if isinstance(model.backend, BatchingBackend):
            reply.parallel = model.backend.slots
        if isinstance(model.backend, KeepsPrefixes):
            reply.cached_prefix_tokens = model.backend.prefix_tokens
        if isinstance(model.backend, EmbeddingBackend):
            reply.embedding_length = model.backend.embedding_length
            reply.embedding_pooling = model.backend.pooling
        if model.program.spec is not None:
            describe_program(reply, model.program.spec)
        for slot in scheduler.slot_states():
            reply.slots.add(
                id=slot.id, processing=slot.processing, held_tokens=slot.held_tokens,
                prompt_tokens=slot.prompt_tokens, decoded_tokens=slot.decoded_tokens,
            )  # fmt: skip
        return reply

    # -- plumbing -----------------------------------------------------------------------------

    @staticmethod
    def _prepare_generate(
        backend: Backend, messages: list[dict[str, str]], text: str | None
    ) -> PreparedPrompt:
        if text is None:
            return backend.prepare(messages)
        try:
            return backend.prepare_text(text)
        except ValueError as err:
            raise check.invalid("prompt", str(err)) from None

    def _prepare(self, codec: PromptCodec, messages: list[dict[str, str]]) -> PreparedPrompt:
        model, _, _ = self._ready()
        return prepare_answer(model.backend, codec, messages, typed=self._settings.typed_decoding)

    def _ready(self) -> tuple[LoadedModel, Scheduler, Limits]:
        if self._model is None or self._scheduler is None or self._limits is None:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry")
        return self._model, self._scheduler, self._limits

    def _submit(self, scheduler: Scheduler, prompt: Any, params: Any, context: Any) -> Job:
        try:
            job = scheduler.submit(prompt, params, deadline=_deadline(context))
        except QueueFull as err:
            raise RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {err}") from err
        except SchedulerClosed as err:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, str(err)) from err
        self._metrics.queue_depth.set(scheduler.waiting)
        return job

    async def _drain(
        self, job: Job, context: Any, deltas: Deltas | None = None
    ) -> tuple[str, list[TokenPiece], Finished, float | None]:
        """Collect a job's whole output (Predict), handing its text to `deltas` as it comes."""
        text: list[str] = []
        pieces: list[TokenPiece] = []
        first_token_at: float | None = None
        try:
            async for event in job.events():
                if isinstance(event, TokenPiece):
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    pieces.append(event)
                    text.append(event.text)
                    if deltas is not None:
                        deltas.text(event.text)
                else:
                    self._finish_or_fail(event, job, context)
                    self._count_tokens(event)
                    if deltas is not None:
                        deltas.text(event.text)
                        deltas.close()
                    return "".join(text), pieces, event, first_token_at
        except BackendError as err:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, f"model backend failed: {err}") from err
        finally:
            job.cancel()
        raise RpcFailure(grpc.StatusCode.INTERNAL, "generation ended without a result")

    def _finish_or_fail(self, event: Finished, job: Job, context: Any) -> None:
        if event.reason == "cancelled":
            if job.deadline is not None and time.monotonic() >= job.deadline:
                raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            raise RpcFailure(grpc.StatusCode.CANCELLED, "cancelled")

    def _count_tokens(self, event: Finished) -> None:
        self._metrics.tokens.labels("prompt").inc(event.prompt_tokens)
        self._metrics.tokens.labels("completion").inc(event.completion_tokens)
        if self._scheduler is not None:
            self._metrics.queue_depth.set(self._scheduler.waiting)

    async def _unary(
        self,
        method: str,
        handler: Callable[[Any, Any], Awaitable[R]],
        request: Any,
        context: Any,
    ) -> R:
        async with call_status(context, self._counter(method)):
            return await handler(request, context)

    async def _streamed(
        self, method: str, chunks: AsyncIterator[S], context: Any
    ) -> AsyncIterator[S]:
        """A server-streaming RPC's chunks, its status counted and a failure sent as one."""
        async with call_status(context, self._counter(method)):
            async for chunk in chunks:
                yield chunk

    def _counter(self, method: str) -> Callable[[grpc.StatusCode], None]:
        started = time.perf_counter()
        return lambda code: self._observe(method, code, started)

    def _observe(self, method: str, code: grpc.StatusCode, started: float) -> None:
        self._metrics.calls.labels(method, code.name).inc()
        self._metrics.latency.labels(method).observe(time.perf_counter() - started)


def _deltas(codec: PromptCodec, predictor: str, emit: Emit | None) -> Deltas | None:
    """A predictor call's output text for PredictStream's `emit`; None for a Predict."""
    return None if emit is None else Deltas(predictor, [f.name for f in codec.spec.outputs], emit)


def _deadline(context: Any) -> float | None:
    """The call's deadline as a time.monotonic() value; None when it has none."""
    remaining = context.time_remaining()
    if remaining is None or not math.isfinite(remaining):
        return None
    return float(time.monotonic() + remaining)


class _Stop(threading.Event):
    """Set when a call must stop (its client went away), or past its deadline (a
    time.monotonic() value). Called, it says whether to stop."""

    def __init__(self, deadline: float | None) -> None:
        super().__init__()
        self._deadline = deadline

    def __call__(self) -> bool:
        return self.is_set() or self._expired()

    def _expired(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def failure(self) -> RpcFailure:
        if self._expired():
            return RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        return RpcFailure(grpc.StatusCode.CANCELLED, "cancelled")


def _check_constraint(backend: Backend, json_schema: str | None, grammar: str | None) -> None:
    """INVALID_ARGUMENT naming the field when the backend cannot constrain output by it;
    UNIMPLEMENTED when it takes no such constraint."""
    checks = (("json_schema", json_schema, backend.validate_json_schema),
              ("grammar", grammar, backend.validate_grammar))  # fmt: skip
    for field, value, validate in checks:
        if value is None:
            continue
        try:
            validate(value)
        except ValueError as err:
            raise check.invalid(field, str(err)) from None
        except NotImplementedError as err:
            raise RpcFailure(grpc.StatusCode.UNIMPLEMENTED, f"{field}: {err}") from None


def _predict_params(request: pb.PredictRequest, limits: Limits) -> GenerationParams:
    """Predict's sampling: greedy by default, stopping at the completed marker, log-probs
    kept for the confidence."""
    return check.sampling_params(
        request.options, limits, default_temperature=PREDICT_DEFAULT_TEMPERATURE,
        stop=(COMPLETED_MARKER,), logprobs=True,
    )  # fmt: skip


class ProgramCalls:
    """A running program's Complete: called on its worker thread (or the threads dspy.Parallel
    runs calls on), it runs each predictor call on the event loop and waits for it; `cancel`
    stops the calls in flight and refuses further calls (the client went away or the RPC
    ended)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, params: GenerationParams,
        call: Callable[[str, list[dict[str, str]], GenerationParams],
                       Coroutine[Any, Any, tuple[LmCall, float]]],
    ) -> None:  # fmt: skip
        self._loop = loop
        self._params = params
        self._call = call
        self._made = 0  # calls made so far
        self._lock = threading.Lock()
        self._cancelled = False
        self._in_flight: set[Future[tuple[LmCall, float]]] = set()
        self.queue_ms = 0.0

    def __call__(self, name: str, messages: list[dict[str, str]]) -> LmCall:
        temperature = call_temperature()  # read on the calling thread
        with self._lock:
            if self._cancelled:
                raise RpcFailure(grpc.StatusCode.CANCELLED, "cancelled")
            self._made += 1
            params = self._call_params(temperature, self._made)
            future = asyncio.run_coroutine_threadsafe(
                self._call(name, messages, params), self._loop
            )
            self._in_flight.add(future)
        try:
            call, queue_ms = future.result()
        finally:
            with self._lock:
                self._in_flight.discard(future)
        with self._lock:
            self.queue_ms += queue_ms
        return call

    def _call_params(self, temperature: float | None, number: int) -> GenerationParams:
        """The request's sampling, at the temperature the program set for this call if it
        set one (BestOfN's attempts), each such call on its own seed: the request's seed
        would make every attempt the same."""
        if temperature is None:
            return self._params
        seed = (self._params.seed + number) % 2**31
        return dataclasses.replace(self._params, temperature=temperature, seed=seed)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            for future in self._in_flight:
                future.cancel()


def _queue_ms(job: Job) -> float:
    if job.started_at is None:
        return 0.0
    return (job.started_at - job.submitted_at) * 1000


async def serve(settings: RuntimeSettings, *, ready: Callable[[int], None] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit code."""
    metrics = RuntimeMetrics()
    service = InferenceService(settings, metrics)
    # gRPC's own cap sits above ours, so a moderately oversize request gets our
    # INVALID_ARGUMENT naming the field rather than a bare RESOURCE_EXHAUSTED.
    hard_cap = settings.max_request_bytes * 4 + (64 << 10)
    options: list[tuple[str, int]] = [
        ("grpc.max_receive_message_length", hard_cap),
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.so_reuseport", 0),
    ]
    if settings.max_connection_age_s:
        # gRPC's DNS resolver re-resolves when a connection closes, not on a timer: aged
        # connections are how a balancing client notices replicas added since it dialled.
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.grace_period_s * 1000)),
        ]
    server = grpc.aio.server(
        interceptors=security.interceptors(settings),
        options=options,
        maximum_concurrent_rpcs=max(64, (settings.max_queue + 1) * 4),
    )
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):  # until the model is loaded
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    port, http = await serving.start(server, service, health_servicer, settings,
                                     metrics.registry)  # fmt: skip
    if ready is not None:
        ready(port)
    stop = serving.stop_requested()

    log.info("loading model", extra={"port": port})
    loader = asyncio.ensure_future(asyncio.to_thread(load_model, settings))
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not loader.done():  # stopped while loading
        await server.stop(0)
        return 0
    stopper.cancel()
    try:
        model = loader.result()
    except Exception:
        await server.stop(0)
        raise
    service.attach(model)
    try:
        await asyncio.to_thread(service.wait_ready)  # the program prefix, on the model's thread
    except Exception:
        await server.stop(0)
        raise
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving", extra={"host": settings.host, "port": port, "service": SERVICE_NAME})

    await stop.wait()
    log.info("draining", extra={"grace_period_s": settings.grace_period_s})
    await health_servicer.enter_graceful_shutdown()
    await server.stop(settings.grace_period_s)
    if http is not None:
        http.close()
    service.close()
    log.info("stopped")
    return 0
