"""PredictStream: output values sent as the model writes them, then the whole response, from
the runtime (one call at a time and batched) and through the router (local and fallback)."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.core.api import pb
from services.core.client import InferenceClient
from services.core.field_stream import FieldStream
from testkit.bundles import CAPITALS_PROGRAM, make_bundle
from testkit.openai_standin import OpenAIStandIn
from testkit.processes import REPO, ServerProcess, start_router, start_runtime

ANSWERS = [
    "[[ ## category ## ]]\nnetwork\n\n[[ ## completed ## ]]",
    "[[ ## reasoning ## ]]\nThe [[ box ]] is\n\nsplit in two.\n\n[[ ## tags ## ]]\n  [1, 2]  \n\n"
    "[[ ## urgent ## ]]\nFalse\n\n[[ ## completed ## ]]",
    "[[ ## reasoning ## ]]\nA value with [[ ## no header]] in it\n\n[[ ## completed ## ]]",
    "[[ ## reasoning ## ]]\ncut short at max tok",
    "[[ ## reasoning ## ]]\ncut short in a header [[ ## compl",
    "a preamble\n[[ ## other ## ]]\nnot an output\n\n[[ ## tags ## ]]\n\n\nlate\n\n",
]
_SECTION = re.compile(r"\[\[ ## (\w+) ## \]\]\n?(.*?)(?=\n\n\[\[ ## \w+ ## \]\]|\Z)", re.S)


def sections(raw: str, outputs: set[str]) -> dict[str, str]:
    """Each output's value as ChatAdapter splits an answer (stripped)."""
    return {name: value.strip() for name, value in _SECTION.findall(raw) if name in outputs}


@pytest.mark.parametrize("raw", ANSWERS)
def test_field_pieces_joined_are_each_value_however_the_text_is_cut(raw: str) -> None:
    outputs = {"category", "reasoning", "tags", "urgent"}
    chooser = random.Random(0)
    for _ in range(200):
        stream, joined = FieldStream(outputs), dict[str, str]()
        start = 0
        while start < len(raw):
            size = chooser.randint(1, 7)
            for field, text in stream.feed(raw[start : start + size]):
                joined[field] = joined.get(field, "") + text
            start += size
        for field, text in stream.close():
            joined[field] = joined.get(field, "") + text
        assert joined == sections(raw, outputs)
    # nothing that might still be the next header is given early
    held = FieldStream({"reasoning"})
    assert held.feed("[[ ## reasoning ## ]]\nto be\n\n[[ #") == [("reasoning", "to be")]
    assert held.feed("# completed ## ]]") == []


def joined(chunks: list[pb.PredictChunk]) -> dict[tuple[str, str], str]:
    texts: dict[tuple[str, str], str] = {}
    for chunk in chunks[:-1]:
        assert chunk.WhichOneof("chunk") == "delta"
        key = (chunk.delta.predictor, chunk.delta.field)
        texts[key] = texts.get(key, "") + chunk.delta.text
    assert chunks[-1].WhichOneof("chunk") == "response"
    return texts


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, gguf_path: Path) -> Path:
    return make_bundle(tmp_path_factory.mktemp("stream") / "bundle", gguf_path, CAPITALS_PROGRAM,
                       threshold=0.5)  # fmt: skip


@pytest.fixture(scope="module", params=["1", "2"])
def runtime(bundle: Path, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    server = start_runtime("--bundle", str(bundle), "--n-ctx", "1024", "--parallel",
                           request.param)  # fmt: skip
    yield server
    server.terminate()


COUNTRIES = ["Norway", "Peru", "Japan"]


def test_the_runtime_streams_each_value_then_answers_as_predict_does(
    runtime: ServerProcess,
) -> None:
    deltas = []
    with InferenceClient(runtime.target, timeout_s=60) as client:
        for country in COUNTRIES:
            whole = client.predict({"country": country}, include_raw_text=True)
            chunks = list(client.predict_stream({"country": country}, include_raw_text=True))
            streamed = chunks[-1].response
            deltas.append(len(chunks) - 1)
            assert joined(chunks) == {("capitals", f): v for f, v in sections(
                whole.raw_text, {"capital"}).items()}  # fmt: skip
            assert joined(chunks)[("capitals", "capital")] == whole.outputs["capital"]
            assert dict(streamed.outputs) == dict(whole.outputs)
            assert streamed.raw_text == whole.raw_text and streamed.outcome == whole.outcome
            assert streamed.confidence == pytest.approx(whole.confidence)
        with pytest.raises(grpc.RpcError) as refused:
            list(client.predict_stream({"nation": "Peru"}))
    assert max(deltas) > 1  # a value of several tokens came in pieces, as they were written
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith("inputs['nation']")


def test_the_router_streams_the_local_answer_and_ends_with_the_one_it_decided(
    bundle: Path, runtime: ServerProcess
) -> None:
    """Hybrid: the runtime's deltas pass through as they come; the last chunk is the local
    answer, or the API model's when the router falls back (it decides on the whole local
    answer), which `served_by` says."""
    with OpenAIStandIn({"Peru": "Lima"}, input_field="country", output_field="capital") as api:
        for threshold, served_by in (("0.0", pb.SERVED_BY_LOCAL), ("1.01", pb.SERVED_BY_FALLBACK)):
            router = start_router(bundle, runtime.target, "--threshold", threshold,
                                  "--fallback-model", "openai/gold", "--fallback-api-base",
                                  api.base_url)  # fmt: skip
            try:
                with InferenceClient(router.target, timeout_s=60) as client:
                    chunks = list(client.predict_stream({"country": "Peru"}))
                    whole = client.predict({"country": "Peru"})
            finally:
                router.terminate()
            local = joined(chunks)[("capitals", "capital")]
            final = chunks[-1].response
            assert final.served_by == whole.served_by == served_by
            assert dict(final.outputs) == dict(whole.outputs)
            if served_by == pb.SERVED_BY_LOCAL:
                assert local == final.outputs["capital"]
            else:
                assert final.outputs["capital"] == "Lima" and final.route_reason == "low_confidence"


def test_the_cli_prints_values_as_they_come(runtime: ServerProcess) -> None:
    with InferenceClient(runtime.target, timeout_s=60) as client:
        whole = client.predict({"country": "Japan"})
    printed = subprocess.run(
        [sys.executable, "-m", "services.cli", "predict", "--target", runtime.target, "--stream",
         "--input", "country=Japan"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == f"capital: {whole.outputs['capital']}\n"
    assert "parsed · confidence" in printed.stderr


def test_served_program_streams_as_dspy_streamify_does(runtime: ServerProcess) -> None:
    """`ServedProgram.stream` yields what `dspy.streamify(..., async_streaming=False)` yields:
    StreamResponse pieces (the field's last one marked), then the Prediction the call gives."""
    from dspy.streaming import StreamResponse

    from services.core.served_program import ServedProgram

    program = ServedProgram(runtime.target)
    items = list(program.stream(country="Norway"))
    pieces, prediction = items[:-1], items[-1]
    assert pieces and all(isinstance(p, StreamResponse) for p in pieces)
    assert {(p.predict_name, p.signature_field_name) for p in pieces} == {("capitals", "capital")}
    assert [p.is_last_chunk for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(p.chunk for p in pieces) == prediction.capital
    assert prediction.toDict() == program(country="Norway").toDict()
    with pytest.raises(ValueError, match=r"inputs\['nation'\]"):
        list(program.stream(nation="Norway"))
