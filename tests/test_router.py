"""The router with real parts: a real runtime (SmolLM2) on loopback, llama-cpp-python's real
OpenAI-compatible server as the API model ("api-smol"), and an API stand-in for faults."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.json_format import MessageToJson
from grpc_health.v1 import health_pb2

from services.core.api import pb, pb_grpc
from services.core.client import InferenceClient
from testkit.bundles import CAPITALS_PROGRAM
from testkit.openai_standin import OpenAIStandIn
from testkit.processes import ServerProcess, free_port, start_router, start_runtime

PLANTED_KEY = "sk-planted-6f1c0ffee-do-not-leak"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, gguf_path: Path) -> Path:
    from testkit.bundles import make_bundle

    root = make_bundle(tmp_path_factory.mktemp("router") / "bundle", gguf_path, CAPITALS_PROGRAM)
    (root / "calibration.json").write_text(json.dumps({"threshold": 0.5}))
    from services.core.bundle import Bundle, write_manifest

    manifest = Bundle.open(root, verify=False).manifest
    write_manifest(root, manifest.model_copy(update={"calibration": "calibration.json"}))
    return root


@pytest.fixture(scope="module")
def local_runtime(bundle: Path) -> Iterator[ServerProcess]:
    server = start_runtime("--bundle", str(bundle), "--n-ctx", "2048")
    yield server
    server.terminate()


def predict(router: ServerProcess, country: str = "Germany", **kw: int) -> pb.PredictResponse:
    with InferenceClient(router.target, timeout_s=60) as client:
        return client.predict({"country": country}, **kw)


def test_confident_local_answer_stays_local(bundle: Path, local_runtime: ServerProcess) -> None:
    router = start_router(bundle, local_runtime.target, "--threshold", "0.0",
                          "--fallback-model", "openai/unused", "--fallback-api-base",
                          "http://127.0.0.1:9/v1")  # fmt: skip
    try:
        reply = predict(router)
        info = InferenceClient(router.target).info()
    finally:
        router.terminate()
    assert reply.served_by == pb.SERVED_BY_LOCAL and not reply.degraded
    assert reply.route_reason == "" and reply.threshold == 0.0
    assert reply.outputs["capital"] and 0 < reply.confidence <= 1
    assert info.bundle_version  # GetModelInfo passes through to the runtime


def test_calibrated_threshold_comes_from_the_bundle(
    bundle: Path, local_runtime: ServerProcess
) -> None:
    router = start_router(bundle, local_runtime.target, "--mode", "local_only")
    try:
        reply = predict(router)
    finally:
        router.terminate()
    assert reply.threshold == pytest.approx(0.5)


def test_low_confidence_goes_to_the_api(
    bundle: Path, local_runtime: ServerProcess, openai_server: str
) -> None:
    router = start_router(bundle, local_runtime.target, "--threshold", "1.01",
                          "--fallback-model", "openai/teacher-smol",
                          "--fallback-api-base", openai_server,
                          "--api-timeout-s", "60")  # fmt: skip
    try:
        reply = predict(router)
    finally:
        router.terminate()
    assert reply.served_by == pb.SERVED_BY_FALLBACK, reply
    assert reply.route_reason == "low_confidence" and reply.model_id == "openai/teacher-smol"
    assert reply.outputs["capital"].strip()
    assert reply.threshold == pytest.approx(1.01)


def test_unparsable_local_output_goes_to_the_api(
    bundle: Path, local_runtime: ServerProcess
) -> None:
    metrics_port = free_port()
    with OpenAIStandIn({"Spain": "Madrid"}, input_field="country", output_field="capital") as api:
        router = start_router(bundle, local_runtime.target, "--threshold", "0.0",
                              "--fallback-model", "openai/gold", "--fallback-api-base",
                              api.base_url, "--metrics-port", str(metrics_port))  # fmt: skip
        try:
            reply = predict(router, "Spain", max_tokens=1)  # truncated: cannot parse
            counted = metrics_text(metrics_port)
        finally:
            router.terminate()
    assert reply.served_by == pb.SERVED_BY_FALLBACK and reply.route_reason == "unparsed"
    assert reply.outputs["capital"] == "Madrid"
    # The API's call and the tokens it counted (the stand-in counts words), not the local's
    [call] = reply.lm_calls
    assert call.predictor == "capitals" and call.usage == reply.usage
    assert reply.usage.prompt_tokens > 20 and 0 < reply.usage.completion_tokens < 20
    # The API sampled every token it returned, as a runtime's unforced call does.
    assert reply.usage.decode_steps == reply.usage.completion_tokens
    tokens = f'edgedistill_router_api_tokens_total{{kind="prompt"}} {reply.usage.prompt_tokens}.0'
    assert tokens in counted


def metrics_text(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()


@pytest.mark.parametrize("fault", ["closed_port", "slow", "http_500"])
def test_api_faults_give_flagged_local_answers_and_the_breaker_opens_then_closes(
    bundle: Path, local_runtime: ServerProcess, fault: str
) -> None:
    metrics_port = free_port()
    with OpenAIStandIn({"Peru": "Lima"}, input_field="country", output_field="capital",
                       mode={"slow": "slow", "http_500": "error"}.get(fault, "gold"),
                       delay_s=3.0) as api:  # fmt: skip
        base = "http://127.0.0.1:9/v1" if fault == "closed_port" else api.base_url
        router = start_router(
            bundle, local_runtime.target, "--threshold", "1.01", "--fallback-model", "openai/gold",
            "--fallback-api-base", base, "--api-timeout-s", "0.5", "--api-retries", "1",
            "--breaker-failures", "2", "--breaker-reset-s", "1.5",
            "--metrics-port", str(metrics_port),
        )  # fmt: skip
        try:
            first, second = predict(router, "Peru"), predict(router, "Peru")
            for reply in (first, second):
                assert reply.served_by == pb.SERVED_BY_LOCAL and reply.degraded
                assert reply.route_reason == "low_confidence:api_error"
            started = time.monotonic()
            third = predict(router, "Peru")  # breaker open: no API call at all
            assert third.route_reason == "low_confidence:circuit_open" and third.degraded
            assert time.monotonic() - started < 5
            text = metrics_text(metrics_port)
            assert "edgedistill_router_breaker_state 2.0" in text
            kind = "timeout" if fault == "slow" else "error"
            assert f'edgedistill_router_api_errors_total{{kind="{kind}"}} 4.0' in text

            if fault == "closed_port":
                return
            api.mode = "gold"  # the API recovers
            time.sleep(1.6)  # past breaker_reset_s: the next call is the half-open probe
            recovered = predict(router, "Peru")
            assert recovered.served_by == pb.SERVED_BY_FALLBACK
            assert recovered.outputs["capital"] == "Lima"
            assert "edgedistill_router_breaker_state 0.0" in metrics_text(metrics_port)
        finally:
            router.terminate()


def test_an_api_answer_that_does_not_parse_is_not_asked_again(
    bundle: Path, local_runtime: ServerProcess
) -> None:
    """At temperature 0 the API would answer alike: retrying an answer that did not parse pays
    for the same failure again. One attempt (DSPy's own JSON retry included), then the local
    answer, flagged."""
    with OpenAIStandIn({"Chile": "Santiago"}, input_field="country", output_field="capital",
                       mode="unparsable") as api:  # fmt: skip
        router = start_router(bundle, local_runtime.target, "--threshold", "1.01",
                              "--fallback-model", "openai/gold", "--fallback-api-base",
                              api.base_url, "--api-retries", "2")  # fmt: skip
        try:
            reply = predict(router, "Chile")
        finally:
            router.terminate()
        asked = api.requests
    assert reply.served_by == pb.SERVED_BY_LOCAL and reply.degraded
    assert reply.route_reason == "low_confidence:api_error"
    assert 1 <= asked <= 2, asked  # three attempts would be 3 to 6
    # With no local answer to fall back on, the client is told how the API failed.
    with OpenAIStandIn({"Chile": "Santiago"}, input_field="country", output_field="capital",
                       mode="unparsable") as api:  # fmt: skip
        router = start_router(bundle, local_runtime.target, "--mode", "api_only",
                              "--fallback-model", "openai/gold", "--fallback-api-base",
                              api.base_url)  # fmt: skip
        try:
            with pytest.raises(grpc.RpcError) as failed:
                predict(router, "Chile")
        finally:
            router.terminate()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failed.value.details().startswith("the API model failed (AdapterParseError: ")


def test_budget_exhausted_answers_locally(bundle: Path, local_runtime: ServerProcess) -> None:
    with OpenAIStandIn({"Chile": "Santiago"}, input_field="country", output_field="capital") as api:
        router = start_router(bundle, local_runtime.target, "--threshold", "1.01",
                              "--fallback-model", "openai/gold", "--fallback-api-base",
                              api.base_url, "--budget-per-minute", "1")  # fmt: skip
        try:
            first, second = predict(router, "Chile"), predict(router, "Chile")
        finally:
            router.terminate()
        assert api.requests == 1
    assert first.served_by == pb.SERVED_BY_FALLBACK
    assert second.served_by == pb.SERVED_BY_LOCAL and second.degraded
    assert second.route_reason == "low_confidence:budget_exhausted"


def test_runtime_down_goes_to_the_api_or_is_unavailable_fast(bundle: Path) -> None:
    closed = f"127.0.0.1:{free_port()}"
    with OpenAIStandIn({"Japan": "Tokyo"}, input_field="country", output_field="capital") as api:
        router = start_router(bundle, closed, "--threshold", "0.0", "--fallback-model",
                              "openai/gold", "--fallback-api-base", api.base_url)  # fmt: skip
        try:
            started = time.monotonic()
            reply = predict(router, "Japan")
            assert time.monotonic() - started < 1.0
        finally:
            router.terminate()
    assert reply.served_by == pb.SERVED_BY_FALLBACK and reply.route_reason == "local_unavailable"
    assert reply.outputs["capital"] == "Tokyo"

    # Nothing to answer with: the router says NOT_SERVING, and calls fail fast.
    router = start_router(bundle, closed, "--mode", "local_only", "--threshold", "0.0",
                          status=health_pb2.HealthCheckResponse.NOT_SERVING)  # fmt: skip
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            predict(router, "Japan")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 1.0
    finally:
        router.terminate()


def generate(router: ServerProcess, content: str, **options: int) -> list[pb.GenerateChunk]:
    request = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=content)],
                                 options=pb.SamplingOptions(**options), stop=["\n"])  # fmt: skip
    with grpc.insecure_channel(router.target) as channel:
        return list(pb_grpc.InferenceStub(channel).Generate(request, timeout=120))


def post_json(url: str, body: dict[str, object]) -> dict[str, Any]:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as reply:
        answer: dict[str, Any] = json.load(reply)
    return answer


def test_generate_goes_to_the_api_with_no_runtime_up_or_in_api_only(
    bundle: Path, local_runtime: ServerProcess, openai_server: str
) -> None:
    api = ("--fallback-model", "openai/teacher-smol", "--fallback-api-base", openai_server,
           "--api-timeout-s", "60")  # fmt: skip
    closed, metrics_port = f"127.0.0.1:{free_port()}", free_port()
    # hybrid: the API answers what no runtime can
    router = start_router(bundle, closed, *api, "--metrics-port", str(metrics_port))
    try:
        *pieces, last = generate(router, "Name a colour.", max_tokens=8, temperature=0)
        assert last.served_by == pb.SERVED_BY_FALLBACK and last.model_id == "openai/teacher-smol"
        assert last.finish_reason and 0 < last.time_to_first_token_ms < last.latency_ms
        # streamed as the API sends it, the same text as its answer in one piece
        assert len([p for p in pieces if p.text]) > 1
        whole = post_json(f"{openai_server}/chat/completions", {
            "model": "teacher-smol", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Name a colour."}],
        })["choices"][0]["message"]["content"]  # fmt: skip
        assert "".join(p.text for p in pieces) + last.text == whole and whole.strip()
        # the API's token log-probabilities, when asked for, as a runtime gives them
        with InferenceClient(router.target, timeout_s=120) as client:
            chunks = list(
                client.generate(
                    [("user", "Name a colour.")],
                    max_tokens=8,
                    temperature=0,
                    logprobs=True,
                    top_logprobs=2,
                )
            )
        listed = [item for chunk in chunks for item in chunk.logprobs]
        assert "".join(item.token.token for item in listed) == whole
        assert all(len(i.top_logprobs) == 2 and i.token.logprob <= 0 for i in listed)
        assert chunks[-1].served_by == pb.SERVED_BY_FALLBACK
        with InferenceClient(router.target) as client, pytest.raises(grpc.RpcError) as caught:
            client.tokenize(prompt="Once")  # the local model's tokens: no runtime, no answer
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "tokens are the local model's" in (caught.value.details() or "")
        with InferenceClient(router.target) as client, pytest.raises(grpc.RpcError) as caught:
            client.embed(["Once"])  # nor its vectors: the API model's are of another space
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "vectors are the local model's" in (caught.value.details() or "")
        info = InferenceClient(router.target).info()  # from the bundle: no runtime to ask
        assert info.backend == "api:openai/teacher-smol" and info.model_name == "capitals"
        assert [f.name for f in info.signature.input_fields] == ["country"]
        with pytest.raises(grpc.RpcError) as caught:  # checked before the API is asked
            generate(router, "x", max_tokens=5000)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (caught.value.details() or "").startswith("options.max_tokens")
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(router.target))  # the API: chats only
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(pb.GenerateRequest(prompt="Once")))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (caught.value.details() or "").startswith("prompt: no runtime answered")
        with pytest.raises(grpc.RpcError) as caught:  # nor a llama.cpp grammar
            list(stub.Generate(pb.GenerateRequest(messages=[pb.ChatMessage(
                role="user", content="Yes?")], grammar='root ::= "yes"')))  # fmt: skip
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (caught.value.details() or "").startswith("grammar: no runtime answered")
        with pytest.raises(grpc.RpcError) as caught:  # nor the local model's token ids
            list(stub.Generate(pb.GenerateRequest(messages=[pb.ChatMessage(
                role="user", content="Yes?")], logit_bias={42: -100.0})))  # fmt: skip
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (caught.value.details() or "").startswith("logit_bias: no runtime answered")
        counted = metrics_text(metrics_port)
        assert 'edgedistill_router_fallbacks_total{reason="local_unavailable"} 2.0' in counted
        assert 'edgedistill_router_calls_total{code="OK",method="GetModelInfo"} 1.0' in counted
    finally:
        router.terminate()
    router = start_router(bundle, local_runtime.target, "--mode", "api_only", *api)
    try:
        assert generate(router, "Name a colour.", max_tokens=8)[-1].served_by == (
            pb.SERVED_BY_FALLBACK
        )
    finally:
        router.terminate()
    router = start_router(bundle, local_runtime.target, *api)
    try:
        *_, last = generate(router, "Name a colour.", max_tokens=8)
        assert last.served_by == pb.SERVED_BY_LOCAL and last.model_id == "capitals"
    finally:
        router.terminate()
    router = start_router(bundle, closed, "--mode", "local_only",
                          status=health_pb2.HealthCheckResponse.NOT_SERVING)  # fmt: skip
    try:
        with pytest.raises(grpc.RpcError) as caught:
            generate(router, "Name a colour.")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "mode is local_only" in (caught.value.details() or "")
    finally:
        router.terminate()


def test_an_api_answer_cut_mid_stream_is_an_error_after_its_text(bundle: Path) -> None:
    """What the API sent reaches the client as it came; the failure after it is UNAVAILABLE
    (not a short answer that looks finished), counted, and not retried: the client has text."""
    metrics_port = free_port()
    with OpenAIStandIn({}, mode="cut") as api:
        router = start_router(
            bundle, f"127.0.0.1:{free_port()}", "--fallback-model", "openai/cut",
            "--fallback-api-base", api.base_url, "--api-retries", "2",
            "--metrics-port", str(metrics_port),
        )  # fmt: skip
        try:
            request = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="Hi")])
            texts = []
            with (
                grpc.insecure_channel(router.target) as channel,
                pytest.raises(grpc.RpcError) as caught,
            ):
                for chunk in pb_grpc.InferenceStub(channel).Generate(request, timeout=60):
                    texts.append(chunk.text)
            metrics = metrics_text(metrics_port)
        finally:
            router.terminate()
        whole = api.answer([{"role": "user", "content": "Hi"}])
        assert texts == [whole[: len(whole) // 2]] and api.requests == 1
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "the API fallback failed" in (caught.value.details() or "")
    assert 'edgedistill_router_api_errors_total{kind="error"} 1.0' in metrics


def test_an_api_that_gives_no_log_probabilities_is_an_error_before_any_text(
    bundle: Path,
) -> None:
    """A Generate that asks for log-probabilities never gets the API's text without them:
    the call fails before any text is sent, naming why, and is not retried."""
    with OpenAIStandIn({}, mode="cut") as api:  # its first piece carries no logprobs
        router = start_router(
            bundle, f"127.0.0.1:{free_port()}", "--fallback-model", "openai/plain",
            "--fallback-api-base", api.base_url, "--api-retries", "2",
        )  # fmt: skip
        try:
            with InferenceClient(router.target) as client, pytest.raises(grpc.RpcError) as caught:
                texts = [c.text for c in client.generate([("user", "Hi")], logprobs=True)]
        finally:
            router.terminate()
        assert api.requests == 1
    assert "texts" not in locals()  # nothing reached the client
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "without log-probabilities" in (caught.value.details() or "")


def test_a_planted_api_key_never_leaks(bundle: Path, local_runtime: ServerProcess) -> None:
    metrics_port = free_port()
    with OpenAIStandIn({}, input_field="country", output_field="capital", mode="error") as api:
        router = start_router(
            bundle, local_runtime.target, "--threshold", "1.01", "--fallback-model", "openai/gold",
            "--fallback-api-base", api.base_url, "--fallback-key-env", "PLANTED_API_KEY",
            "--metrics-port", str(metrics_port), "--log-level", "debug",
            env={"PLANTED_API_KEY": PLANTED_KEY},
        )  # fmt: skip
        try:
            replies = [predict(router, "Chile"), predict(router, "Chile")]
            metrics = metrics_text(metrics_port)
        finally:
            router.terminate()
    assert all(r.degraded for r in replies)
    assert "internal error for" in router.stderr  # the log says why, the key redacted
    assert PLANTED_KEY not in router.stderr
    assert PLANTED_KEY not in metrics
    assert all(PLANTED_KEY not in MessageToJson(r) for r in replies)


def test_missing_key_variable_fails_at_start(bundle: Path) -> None:
    import subprocess
    import sys

    from testkit.processes import REPO

    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "route", "--bundle", str(bundle), "--local",
         "127.0.0.1:1", "--fallback-model", "openai/x", "--fallback-key-env", "NOT_SET_ANYWHERE",
         "--port", "0", "--metrics-port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "NOT_SET_ANYWHERE" in proc.stderr and "fallback_key_env" in proc.stderr


def test_self_check_confidence_follows_the_local_models_own_verdict(
    bundle: Path, local_runtime: ServerProcess
) -> None:
    """--confidence self_check: the router asks the local model whether its answer is right
    (greedy); "yes" keeps the answer local with confidence 1, anything else sends it to the API
    with confidence 0. The verdicts expected here are asked of the runtime directly."""
    from services.router.server import SELF_CHECK_PROMPT

    countries = ["Germany", "Italy", "Peru", "Atlantis", "Kenya"]
    gold = {c: f"gold-{c}" for c in countries}
    expected = {}
    with InferenceClient(local_runtime.target, timeout_s=60) as client:
        for country in countries:
            local = client.predict({"country": country})
            prompt = SELF_CHECK_PROMPT.format(
                instructions=CAPITALS_PROGRAM["instructions"],
                inputs=f"country: {country}",
                outputs="\n".join(f"{k}: {v}" for k, v in local.outputs.items()),
            )
            verdict = "".join(
                c.text for c in client.generate([("user", prompt)], max_tokens=3, temperature=0)
            )
            expected[country] = verdict.strip().lower().startswith("yes")
    with OpenAIStandIn(gold, input_field="country", output_field="capital") as api:
        router = start_router(bundle, local_runtime.target, "--confidence", "self_check",
                              "--threshold", "0.5", "--fallback-model", "openai/gold",
                              "--fallback-api-base", api.base_url)  # fmt: skip
        try:
            replies = {country: predict(router, country) for country in countries}
        finally:
            router.terminate()
    for country, reply in replies.items():
        if expected[country]:
            assert reply.served_by == pb.SERVED_BY_LOCAL and reply.confidence == 1.0, country
        else:
            assert reply.served_by == pb.SERVED_BY_FALLBACK, country
            assert reply.route_reason == "low_confidence" and reply.confidence == 0.0
            assert reply.outputs["capital"] == gold[country]


def test_local_targets_become_grpc_targets_balanced_by_grpc() -> None:
    from services.router.upstream import channel_targets, service_config

    assert channel_targets(["127.0.0.1:5001", "127.0.0.1:5002"]) == [
        "ipv4:127.0.0.1:5001,127.0.0.1:5002"  # one channel: gRPC's round_robin spreads calls
    ]
    assert channel_targets(["[::1]:5001", "runtime:50051", "dns:///rt.ns.svc:50051"]) == [
        "ipv6:[::1]:5001", "runtime:50051", "dns:///rt.ns.svc:50051"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="local: 'runtime' is neither HOST:PORT"):
        channel_targets(["runtime"])
    config = json.loads(service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "edgedistill.v1.Inference"}


def test_the_instant_stand_in_runtime_serves_the_whole_service(tmp_path: Path) -> None:
    """bench/router_capacity.py's STAND-IN runtime starts and registers every RPC the proto
    lists: Predict answers at once, the RPCs it does not serve are UNIMPLEMENTED."""
    import subprocess
    import sys

    from testkit.processes import REPO

    program = tmp_path / "program.json"
    program.write_text(json.dumps(CAPITALS_PROGRAM))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "testkit.instant_runtime", "--port", str(port),
                             "--program", str(program)], cwd=REPO)  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = pb_grpc.InferenceStub(channel)
            reply = stub.Predict(pb.PredictRequest(inputs={"country": "Peru"}), timeout=10)
            with pytest.raises(grpc.RpcError) as unserved:
                stub.Tokenize(pb.TokenizeRequest(prompt="x"), timeout=10)
        assert reply.outputs["capital"] == "capital" and reply.confidence == 1.0
        assert unserved.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        proc.terminate()
        proc.wait(10)
