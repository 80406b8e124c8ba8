"""The router's gRPC server: the same Inference service, local first, API where it pays."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Literal, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2

from services.core import predict_stream, security, serving
from services.core import validation as check
from services.core.api import SERVICE_NAME, pb, pb_grpc
from services.core.bundle import Bundle, failed_gate
from services.core.config import RouterSettings
from services.core.harvest import HarvestRecord
from services.core.harvest import now as harvest_now
from services.core.model_info import describe_program
from services.core.pipeline import PipelineSpec, read_program_file
from services.core.predict_stream import Emit
from services.core.program import ProgramSpec
from services.core.rpc_status import call_status
from services.core.sampling import (
    GENERATE_DEFAULT_TEMPERATURE,
    MAX_TOKENS_DEFAULT,
    MAX_TOKENS_LIMIT,
)
from services.core.usage import usage_of
from services.core.validation import Limits, RpcFailure
from services.router.decision import (
    Action,
    Decision,
    Gates,
    LocalAnswer,
    after_api_error,
    decide,
)
from services.router.fallback import ApiError, FallbackModel, Generated
from services.router.harvest import HarvestWriter
from services.router.metrics import RouterMetrics
from services.router.policy import CallBudget, CircuitBreaker, FallbackRateCap
from services.router.restart import FallbackStream
from services.router.upstream import LocalRuntimes, LocalUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

# What a Generate sent to the API model may ask for (a runtime's defaults; the API has its own).
API_MAX_REQUEST_BYTES = 1 << 20
API_LIMITS = Limits(max_tokens_default=MAX_TOKENS_DEFAULT, max_tokens_limit=MAX_TOKENS_LIMIT,
                    max_request_bytes=API_MAX_REQUEST_BYTES, context_length=0)  # fmt: skip

# Health entry that is SERVING while some local runtime passes its health check.
LOCAL_HEALTH_SERVICE = "edgedistill.router.LocalRuntime"

SELF_CHECK_PROMPT = (
    "Here is a task, its input and a proposed answer.\n\nTask: {instructions}\n\n{inputs}\n\n"
    "Proposed answer:\n{outputs}\n\nIs the proposed answer correct? Reply with yes or no."
)


class RouterService(pb_grpc.InferenceServicer):
    def __init__(
        self,
        settings: RouterSettings,
        program: ProgramSpec | PipelineSpec,
        threshold: float,
        local: LocalRuntimes,
        fallback: FallbackModel | None,
        metrics: RouterMetrics,
        harvest: HarvestWriter | None = None,
        bundle: tuple[str, str] = ("", ""),  # the bundle's name and version
    ) -> None:
        self._settings = settings
        self._harvest = harvest
        self._bundle = bundle
        self._bundle_id = "@".join(bundle)
        self._program = program
        self._threshold = threshold
        self._local = local
        self._fallback = fallback
        self._metrics = metrics
        self._breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s)
        self._budget = CallBudget(settings.budget_per_minute, settings.budget_per_day)
        self._rate_cap = FallbackRateCap(settings.max_fallback_rate, settings.fallback_rate_window)
        self._inputs = list(program.inputs)
        self._output_order = [f.name for f in program.outputs]
        self._update_gauges()

    # -- RPCs ---------------------------------------------------------------------------------

    async def Predict(self, request: pb.PredictRequest, context: Any) -> pb.PredictResponse:
        started = time.perf_counter()
        try:
            async with call_status(context, self._counter("Predict")):
                response = await self._predict(request, context)
                response.latency_ms = (time.perf_counter() - started) * 1000
                self._metrics.answers.labels(pb.ServedBy.Name(response.served_by)).inc()
                return response
        finally:
            self._update_gauges()

    async def PredictStream(
        self, request: pb.PredictRequest, context: Any
    ) -> AsyncIterator[pb.PredictChunk]:
        started = time.perf_counter()
        try:
            async with call_status(context, self._counter("PredictStream")):
                async for chunk in self._predict_stream(request, context):
                    if chunk.HasField("response"):
                        chunk.response.latency_ms = (time.perf_counter() - started) * 1000
                        served_by = pb.ServedBy.Name(chunk.response.served_by)
                        self._metrics.answers.labels(served_by).inc()
                    yield chunk
        finally:
            self._update_gauges()

    async def Generate(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateChunk]:
        async with call_status(context, self._counter("Generate")):
            async for chunk in self._generate(request, context):
                yield chunk

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Any) -> pb.ModelInfo:
        async with call_status(context, self._counter("GetModelInfo")):  # counted as the runtime's
            try:
                reply: pb.ModelInfo = await self._local.call("GetModelInfo", request, 5.0)
                return reply
            except LocalUnavailable:
                if self._fallback is not None:  # the API answers: the bundle says what it serves
                    return self._bundle_info(self._fallback.model)
                unavailable = "no local runtime is available"
                raise RpcFailure(grpc.StatusCode.UNAVAILABLE, unavailable) from None

    async def Tokenize(self, request: pb.TokenizeRequest, context: Any) -> pb.TokenizeResponse:
        reply: pb.TokenizeResponse = await self._runtime_only(
            "Tokenize", request, context, "tokens are the local model's"
        )
        return reply

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: Any
    ) -> pb.DetokenizeResponse:
        reply: pb.DetokenizeResponse = await self._runtime_only(
            "Detokenize", request, context, "tokens are the local model's"
        )
        return reply

    async def Embed(self, request: pb.EmbedRequest, context: Any) -> pb.EmbedResponse:
        reply: pb.EmbedResponse = await self._runtime_only(
            "Embed",
            request,
            context,
            "vectors are the local model's (the API model's would not compare with them)",
        )
        return reply

    async def _runtime_only(self, method: str, request: Any, context: Any, why: str) -> Any:
        """A call only the local model can answer: a runtime answers it, or it is
        UNAVAILABLE saying `why` (the API model's tokens and vectors are not the local ones)."""
        async with call_status(context, self._counter(method)):
            try:
                return await self._local.call(method, request, self._timeout(context))
            except LocalUnavailable:
                unavailable = f"no local runtime is available: {why}"
                raise RpcFailure(grpc.StatusCode.UNAVAILABLE, unavailable) from None

    def _bundle_info(self, api_model: str) -> pb.ModelInfo:
        name, version = self._bundle
        info = pb.ModelInfo(model_name=name, bundle_version=version, backend=f"api:{api_model}",
                            max_tokens_limit=MAX_TOKENS_LIMIT,
                            max_tokens_default=MAX_TOKENS_DEFAULT, parallel=1)  # fmt: skip
        describe_program(info, self._program)
        return info

    # -- the decision (services/router/decision.py) and carrying it out ----------------------

    async def _generate(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateChunk]:
        """A runtime answers when one is up; the API model when none is (hybrid) or always
        (api_only). A generation has no confidence to judge, so nothing else sends it away."""
        if self._settings.mode != "api_only":
            try:
                async for chunk in self._local.generate(request, self._timeout(context)):
                    yield chunk
                return
            except LocalUnavailable:
                pass
        decided = self._decide(None)
        if decided.action is Action.FALLBACK:
            try:
                async for chunk in self._api_generate(request, decided.reason):
                    yield chunk
                return
            except ApiError as err:
                decided = after_api_error(decided, None, err.summary)
        raise RpcFailure(grpc.StatusCode[decided.status], decided.message)

    async def _api_generate(
        self, request: pb.GenerateRequest, reason: str
    ) -> AsyncIterator[pb.GenerateChunk]:
        """The API model's answer streamed as it comes, checked first as a runtime checks a
        call; ApiError when it fails (before or after text has gone out)."""
        fallback = self._fallback
        assert fallback is not None
        check.check_size(request, API_MAX_REQUEST_BYTES)
        if check.raw_prompt(request) is not None:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "prompt: no runtime answered, and the "
                             "API model answers chats (messages) only")  # fmt: skip
        if request.grammar:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "grammar: no runtime answered, and "
                             "the API model takes no llama.cpp grammar")  # fmt: skip
        if request.logit_bias:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "logit_bias: no runtime answered, and "
                             "its token ids are the local model's")  # fmt: skip
        messages = check.chat_messages(request)
        params = check.sampling_params(
            request.options, API_LIMITS, default_temperature=GENERATE_DEFAULT_TEMPERATURE,
            stop=check.stop_strings(request), json_schema=_json_schema(request.json_schema),
            **check.logprob_request(request),
        )  # fmt: skip
        seed = request.options.seed if request.options.HasField("seed") else None
        started, first = time.perf_counter(), None
        with self._api_accounting(reason) as account:
            async for piece in fallback.stream(messages, params, seed):
                first = first or time.perf_counter()
                if piece.final is None:
                    yield pb.GenerateChunk(text=piece.text, logprobs=piece.logprobs)
                    continue
                seconds = time.perf_counter() - started
                account(seconds)
                last = _last_api_chunk(piece.final, fallback.model, seconds, first - started)
                self._count_api_tokens(last.usage)
                yield last

    async def _predict(self, request: pb.PredictRequest, context: Any) -> pb.PredictResponse:
        inputs = self._checked_inputs(request)
        local = None
        if self._settings.mode != "api_only":
            local = await self._ask_local(request, context)
        return await self._decided(local, inputs)

    async def _predict_stream(
        self, request: pb.PredictRequest, context: Any
    ) -> AsyncIterator[pb.PredictChunk]:
        """The runtime's deltas as they come, then the decided answer: the local one, or the
        API model's when the router falls back (it decides on the whole local answer)."""
        inputs = self._checked_inputs(request)
        local = None
        if self._settings.mode != "api_only":
            try:
                stream = self._local.stream("PredictStream", request, self._timeout(context))
                async for chunk in stream:
                    if chunk.HasField("response"):
                        local = chunk.response
                    else:
                        yield chunk
            except LocalUnavailable:
                local = None
            except grpc.aio.AioRpcError as err:  # the runtime's own verdict (bad input, busy...)
                raise RpcFailure(err.code(), err.details() or "") from None
        sent: asyncio.Queue[pb.PredictChunk] = asyncio.Queue()
        api = FallbackStream(sent, self._program.name)
        async for chunk in predict_stream.chunks(self._decided(local, inputs, api), sent):
            if chunk.HasField("response"):
                for before in api.before(chunk.response, self._output_order):
                    yield before
            yield chunk

    def _checked_inputs(self, request: pb.PredictRequest) -> dict[str, str]:
        check.check_size(request, 1 << 20)
        return check.predict_inputs(request, self._inputs)

    async def _decided(
        self,
        local: pb.PredictResponse | None,
        inputs: dict[str, str],
        stream: FallbackStream | None = None,
    ) -> pb.PredictResponse:
        """The answer to give: the local one, or the API model's when the policy falls back
        and the API answers (its values sent to `stream` as they come, for PredictStream)."""
        mode = self._settings.mode
        answer = None
        if local is not None:
            local.threshold = self._threshold
            answer = await self._local_answer(local, inputs, mode)
        decided = self._decide(answer)
        if decided.action is Action.FALLBACK:
            emit = None if stream is None else stream.emitter(decided.reason)
            fallback = await self._try_fallback(inputs, decided.reason, emit)
            if not isinstance(fallback, ApiError):
                self._harvest_record("fallback", inputs, local, fallback, decided.reason)
                if local is not None:  # the confidence that sent it away
                    fallback.confidence = local.confidence
                return fallback
            decided = after_api_error(decided, answer, fallback.summary)  # recorded already
        elif decided.action is not Action.FAIL:
            self._rate_cap.record(False)
            if self._harvest is not None and self._harvest.wants_sample():
                self._harvest_record("sample", inputs, local, None, decided.reason or "local")
        if decided.action is Action.FAIL:
            raise RpcFailure(grpc.StatusCode[decided.status], decided.message)
        assert local is not None
        if decided.action is Action.DEGRADED:
            if decided.blocked is not None:
                self._metrics.blocked.labels(decided.blocked).inc()
            local.degraded = True
            local.route_reason = decided.reason
        return local

    def _harvest_record(
        self,
        kind: Literal["fallback", "sample"],
        inputs: dict[str, str],
        local: pb.PredictResponse | None,
        api: pb.PredictResponse | None,
        reason: str,
    ) -> None:
        if self._harvest is None:
            return
        self._harvest.write(HarvestRecord(
            time=harvest_now(), kind=kind, bundle=self._bundle_id, inputs=inputs,
            local_outputs=dict(local.outputs) if local is not None else None,
            local_confidence=local.confidence if local is not None else None,
            local_outcome=pb.PredictOutcome.Name(local.outcome) if local is not None else None,
            api_outputs=dict(api.outputs) if api is not None else None, route_reason=reason,
        ))  # fmt: skip
        self._metrics.harvested.labels(kind).inc()

    async def _ask_local(
        self, request: pb.PredictRequest, context: Any
    ) -> pb.PredictResponse | None:
        """The local answer; None when no runtime is available."""
        try:
            reply: pb.PredictResponse = await self._local.call(
                "Predict", request, self._timeout(context)
            )
            return reply
        except LocalUnavailable:
            return None
        except grpc.aio.AioRpcError as err:  # the runtime's own verdict (bad input, busy...)
            raise RpcFailure(err.code(), err.details() or "") from None

    async def _local_answer(
        self, local: pb.PredictResponse, inputs: dict[str, str], mode: str
    ) -> LocalAnswer:
        parsed = local.outcome == pb.PREDICT_OUTCOME_PARSED
        if parsed and mode == "hybrid" and self._settings.confidence == "self_check":
            local.confidence = await self._self_check(inputs, dict(local.outputs))
        return LocalAnswer(parsed=parsed, confidence=local.confidence)

    async def _self_check(self, inputs: dict[str, str], outputs: dict[str, str]) -> float:
        """The seed's mode: ask the local model whether its own answer is right (1.0 or 0.0)."""
        prompt = SELF_CHECK_PROMPT.format(
            instructions=self._program.instructions,
            inputs="\n".join(f"{k}: {v}" for k, v in inputs.items()),
            outputs="\n".join(f"{k}: {v}" for k, v in outputs.items()),
        )
        request = pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content=prompt)],
            options=pb.SamplingOptions(max_tokens=3, temperature=0.0),
        )
        text = ""
        try:
            async for chunk in self._local.generate(request, self._settings.local_timeout_s):
                text += chunk.text
        except (LocalUnavailable, grpc.aio.AioRpcError):
            return 0.0
        return 1.0 if text.strip().lower().startswith("yes") else 0.0

    def _decide(self, local: LocalAnswer | None) -> Decision:
        """The decision (a pure function) on this call's facts and the policies' state now."""
        return decide(
            mode=self._settings.mode, local=local, threshold=self._threshold,
            has_fallback=self._fallback is not None, gates=self._gates(),
        )  # fmt: skip

    def _gates(self) -> Gates:
        return Gates(
            breaker_closed=self._breaker.admits(),
            under_rate_cap=self._rate_cap.allows_fallback(),
            budget_left=self._budget.has_room(),
        )

    async def _try_fallback(
        self, inputs: dict[str, str], reason: str, emit: Emit | None = None
    ) -> pb.PredictResponse | ApiError:
        """Send the call to the API (the decision said it may go); its error when it fails."""
        fallback = self._fallback
        assert fallback is not None
        answer = await self._via_api(reason, lambda: fallback.predict(inputs, emit))
        if isinstance(answer, ApiError):
            return answer
        api, _ = answer
        response = pb.PredictResponse(
            outputs=api.outputs,
            outputs_json=api.outputs_json,
            served_by=pb.SERVED_BY_FALLBACK,
            model_id=fallback.model,
            outcome=pb.PREDICT_OUTCOME_PARSED,
            threshold=self._threshold,
            route_reason=reason,
        )
        for call in api.calls:  # the API model's calls, as a runtime lists its own
            usage = usage_of(call)
            response.lm_calls.add(predictor=call.predictor, usage=usage, confidence=1.0)
            self._count_api_tokens(usage)
        response.usage.CopyFrom(usage_of(*api.calls))
        return response

    def _count_api_tokens(self, usage: pb.Usage) -> None:
        self._metrics.api_tokens.labels("prompt").inc(usage.prompt_tokens)
        self._metrics.api_tokens.labels("completion").inc(usage.completion_tokens)

    async def _via_api(
        self, reason: str, ask: Callable[[], Awaitable[tuple[T, float]]]
    ) -> tuple[T, float] | ApiError:
        """One call on the API model under the policies' accounting; its error when it fails."""
        try:
            with self._api_accounting(reason) as account:
                answer = await ask()
                account(answer[1])
        except ApiError as err:
            return err
        return answer

    @contextlib.contextmanager
    def _api_accounting(self, reason: str) -> Iterator[Callable[[float], None]]:
        """The policies' accounting around one API call: the breaker, the budget, the fallback
        rate and the metrics see a Predict and a Generate alike. The body calls the function
        it is given with the call's seconds when the answer is complete; an ApiError raised
        in it is a failure."""

        def answered(seconds: float) -> None:
            self._breaker.record_success()
            self._metrics.api_latency.observe(seconds)
            self._metrics.fallbacks.labels(reason).inc()
            self._rate_cap.record(True)

        self._breaker.allow()  # half-open: this call is the probe
        self._budget.try_spend()
        try:
            yield answered
        except ApiError as err:
            self._breaker.record_failure()
            self._metrics.api_errors.labels(err.kind).inc(err.attempts)
            self._rate_cap.record(False)
            log.warning(
                "fallback failed", extra={"reason": reason, "kind": err.kind, "error": str(err)}
            )
            raise
        except BaseException:  # cancelled (the client left): no verdict on the API
            self._breaker.abandon()
            raise

    def _timeout(self, context: Any) -> float:
        remaining = context.time_remaining()
        limit = self._settings.local_timeout_s
        if remaining is None or not math.isfinite(remaining):
            return limit
        return max(0.001, min(limit, remaining))

    def _counter(self, method: str) -> Callable[[grpc.StatusCode], None]:
        return lambda code: self._metrics.calls.labels(method, code.name).inc()

    def _update_gauges(self) -> None:
        self._metrics.breaker_state.set(self._breaker.state.value)
        self._metrics.fallback_rate.set(self._rate_cap.rate)
        for window, left in self._budget.left().items():
            self._metrics.budget_left.labels(window).set(-1 if math.isinf(left) else left)


def calibrated_threshold(bundle: Bundle, override: float | None, mode: str = "hybrid") -> float:
    if override is not None:
        return override
    calibration = bundle.calibration()
    if calibration is None and mode == "local_only":
        return 0.0  # never consulted: local_only answers locally whatever the confidence
    if calibration is None:
        raise ValueError("threshold: the bundle has no calibration; pass --threshold")
    return float(calibration["threshold"])


def harvest_writer(settings: RouterSettings) -> HarvestWriter | None:
    if settings.harvest is None:
        return None
    days = settings.harvest_max_age_days
    return HarvestWriter(
        settings.harvest,
        max_file_bytes=int(settings.harvest_max_file_mb * 2**20),
        max_records=settings.harvest_max_records,
        max_age_s=days * 86400 if days is not None else None,
        sample_rate=settings.harvest_sample_rate,
    )


def _serving_status(ok: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    if ok:
        return health_pb2.HealthCheckResponse.SERVING
    return health_pb2.HealthCheckResponse.NOT_SERVING


async def serve(settings: RouterSettings, *, ready: Callable[[int], None] | None = None) -> int:
    bundle = Bundle.open(settings.bundle, verify=False)  # the runtime verifies the GGUF
    refusal = None if settings.allow_failed_gate else failed_gate(bundle.manifest)
    if refusal:
        raise ValueError(f"bundle: {refusal}")
    program = read_program_file(bundle.program_path)
    threshold = calibrated_threshold(bundle, settings.threshold, settings.mode)
    fallback = None
    if settings.fallback_model and settings.mode != "local_only":
        fallback = FallbackModel(
            program,
            program_path=bundle.program_path,
            model=settings.fallback_model,
            api_base=settings.fallback_api_base,
            api_key=settings.fallback_key(),
            timeout_s=settings.api_timeout_s,
            retries=settings.api_retries,
            backoff_s=settings.api_backoff_s,
        )
    metrics = RouterMetrics()
    health_servicer = health.aio.HealthServicer()
    # The health service's own entry says only that the process answers: a liveness probe
    # must not restart a router whose runtimes are down (its other entries say that).
    await health_servicer.set(health.SERVICE_NAME, _serving_status(True))

    async def local_health_changed(any_healthy: bool) -> None:
        # SERVING means "can answer": a router with no runtime to reach and no fallback to
        # take over would only answer UNAVAILABLE, so orchestrators and install.sh wait.
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, _serving_status(any_healthy or fallback is not None))
        # Its own entry, so install.sh can wait for the router to see its runtime even when
        # a configured fallback already makes the router as a whole SERVING.
        await health_servicer.set(LOCAL_HEALTH_SERVICE, _serving_status(any_healthy))

    local = LocalRuntimes(
        settings.local,
        credentials=(
            security.channel_credentials(
                settings.local_tls_ca, settings.local_tls_cert, settings.local_tls_key
            )
            if settings.local_tls_ca or settings.local_tls_cert
            else None
        ),
        token=settings.local_token(),
        on_change=local_health_changed,
    )
    await local.start()
    harvest = harvest_writer(settings)
    if harvest is not None:
        metrics.harvest_on_disk.set_function(harvest.records_on_disk)
    service = RouterService(settings, program, threshold, local, fallback, metrics, harvest,
                            (bundle.manifest.name, bundle.manifest.version))  # fmt: skip

    server = grpc.aio.server(
        interceptors=security.interceptors(settings),
        # no SO_REUSEPORT: a second router on a taken port is an error, not a silent share
        options=[("grpc.max_receive_message_length", 8 << 20), ("grpc.so_reuseport", 0)],
    )
    port, http = await serving.start(server, service, health_servicer, settings,
                                     metrics.registry)  # fmt: skip
    log.info(
        "routing",
        extra={"port": port, "mode": settings.mode, "threshold": threshold,
               "fallback_model": settings.fallback_model, "local": settings.local},
    )  # fmt: skip
    if ready is not None:
        ready(port)

    stop = serving.stop_requested()
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(15)
    if http is not None:
        http.close()
    await local.close()
    return 0


def _json_schema(text: str) -> str | None:
    """The call's JSON schema, checked to be a JSON object (the API model applies it)."""
    if not text:
        return None
    try:
        check.json_schema_object(text)
    except ValueError as err:
        raise check.invalid("json_schema", str(err)) from None
    return text


def _last_api_chunk(done: Generated, model: str, seconds: float, to_first: float
                    ) -> pb.GenerateChunk:  # fmt: skip
    """The last chunk of a Generate the API model answered."""
    finish = pb.FINISH_REASON_LENGTH if done.finished_by_length else pb.FINISH_REASON_STOP
    return pb.GenerateChunk(
        finish_reason=finish,
        usage=pb.Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                       decode_steps=done.completion_tokens),  # the API sampled each one
        latency_ms=seconds * 1000, time_to_first_token_ms=to_first * 1000,
        served_by=pb.SERVED_BY_FALLBACK, model_id=model,
    )  # fmt: skip
