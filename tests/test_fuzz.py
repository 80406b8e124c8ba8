"""Fuzzing the runtime's gRPC surface with hypothesis (real server, real model).

Random maps, huge and empty strings, control characters, extreme numbers, and random bytes
through a raw channel: the server never crashes or wedges, every error is INVALID_ARGUMENT or
RESOURCE_EXHAUSTED, and a normal call still succeeds afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core.api import pb, pb_grpc
from testkit.processes import ServerProcess, start_runtime

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TRIED: dict[str, int] = {"predict": 0, "generate": 0, "raw": 0}

any_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs"]), max_size=40),
    st.sampled_from(["", "\x00", "country", "\u202e", "[[ ## completed ## ]]", "\ud7ff" * 3]),
    st.integers(1, 3_000_000).map(lambda n: "y" * n),  # up to beyond the request cap
)
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
options = st.builds(
    pb.SamplingOptions,
    max_tokens=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    temperature=st.one_of(st.none(), floats),
    top_p=st.one_of(st.none(), floats),
    seed=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
)
predict_requests = st.builds(
    pb.PredictRequest,
    inputs=st.dictionaries(st.one_of(st.just("country"), any_text), any_text, max_size=4),
    options=options,
    include_raw_text=st.booleans(),
)
schemas = st.one_of(
    st.just(""),
    any_text,
    st.just(json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5)),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=8,
    ).map(json.dumps),
)
generate_requests = st.builds(
    pb.GenerateRequest,
    messages=st.lists(
        st.builds(
            pb.ChatMessage,
            role=st.one_of(st.sampled_from(["user", "system", "assistant"]), any_text),
            content=any_text,
        ),
        max_size=4,
    ),
    options=options,
    stop=st.lists(any_text, max_size=10),
    json_schema=schemas,
)


def map_entry_with_raw_key(key: bytes) -> bytes:
    """A PredictRequest whose `inputs` map has this (often invalid UTF-8) key, hand-encoded."""
    entry = b"\x0a" + bytes([len(key)]) + key  # MapEntry.key (field 1, length-delimited)
    return b"\x0a" + bytes([len(entry)]) + entry  # PredictRequest.inputs (field 1)


@pytest.fixture(scope="module")
def fuzz_target(gguf_path: Path, program_path: Path) -> Iterator[ServerProcess]:
    # Tiny limits keep the accepted calls short; two slots fuzz the batched scheduler too.
    server = start_runtime(
        "--model", str(gguf_path), "--program", str(program_path), "--n-ctx", "512",
        "--max-tokens-limit", "4", "--max-tokens-default", "4", "--max-queue", "2",
        "--parallel", "2",
    )  # fmt: skip
    yield server
    assert server.proc.poll() is None, f"the server died:\n{server.stderr}"
    server.terminate()


def code_of(call: object) -> grpc.StatusCode:
    try:
        if isinstance(call, Iterator):
            for _ in call:
                pass
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@FUZZ
@given(request=predict_requests)
def test_fuzzed_predict(fuzz_target: ServerProcess, request: pb.PredictRequest) -> None:
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(fuzz_target.target))
    TRIED["predict"] += 1
    try:
        stub.Predict(request, timeout=60)
        code = grpc.StatusCode.OK
    except grpc.RpcError as err:
        code = err.code()
        assert err.details(), "an error says why"
    assert code in ALLOWED, (code, request)


@FUZZ
@given(request=generate_requests)
def test_fuzzed_generate(fuzz_target: ServerProcess, request: pb.GenerateRequest) -> None:
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(fuzz_target.target))
    TRIED["generate"] += 1
    code = code_of(stub.Generate(request, timeout=60))
    assert code in ALLOWED, (code, request)


@FUZZ
@given(
    method=st.sampled_from(["Predict", "Generate", "GetModelInfo"]),
    payload=st.one_of(
        st.binary(max_size=2000),
        # a string field (inputs' key, a message's role) holding invalid UTF-8
        st.binary(min_size=1, max_size=50).map(
            lambda b: b"\x0a" + bytes([len(b) + 2]) + b"\x0a" + bytes([len(b)]) + b
        ),
    ),
)
def test_fuzzed_raw_bytes(fuzz_target: ServerProcess, method: str, payload: bytes) -> None:
    channel = grpc.insecure_channel(fuzz_target.target)
    path = f"/edgedistill.v1.Inference/{method}"
    TRIED["raw"] += 1
    if method == "Generate":
        call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
        code = code_of(call(payload, timeout=60))
    else:
        unary = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        try:
            unary(payload, timeout=60)
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
    assert code in ALLOWED, (code, payload[:80])


def test_after_fuzzing_a_normal_call_succeeds(fuzz_target: ServerProcess) -> None:
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(fuzz_target.target))
    reply = stub.Predict(pb.PredictRequest(inputs={"country": "Italy"}), timeout=60)
    assert reply.outcome in (pb.PREDICT_OUTCOME_PARSED, pb.PREDICT_OUTCOME_TRUNCATED)
    assert 0 < reply.usage.decode_steps <= 4  # the limit counts sampled tokens
