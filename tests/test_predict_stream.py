"""PredictStream: output values sent as the model writes them, then the whole response, from
the runtime (one call at a time and batched) and through the router (local and fallback)."""

from __future__ import annotations

import json
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
from testkit.processes import REPO, ServerProcess, free_port, start_router, start_runtime

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
            final = chunks[-1].response
            assert final.served_by == whole.served_by == served_by
            assert dict(final.outputs) == dict(whole.outputs)
            local, after = split_at_restart(chunks)
            assert all(c.delta.served_by == pb.SERVED_BY_LOCAL for c in local) and local
            if served_by == pb.SERVED_BY_LOCAL:
                assert after == [] and joined(chunks)[("capitals", "capital")] == final.outputs[
                    "capital"]  # fmt: skip
                continue
            # the API model's answer streamed after a restart withdrawing the local one
            restart, *api_deltas = after
            assert restart.restart.served_by == pb.SERVED_BY_FALLBACK
            assert restart.restart.reason == final.route_reason == "low_confidence"
            assert all(c.delta.served_by == pb.SERVED_BY_FALLBACK for c in api_deltas)
            assert joined([*api_deltas, chunks[-1]]) == {("capitals", "capital"): "Lima"}
            assert final.outputs["capital"] == "Lima"


def test_clients_show_a_routers_restart_to_the_api_model(
    bundle: Path, runtime: ServerProcess
) -> None:
    """The CLI prints the local value, says the router fell back and prints the API model's;
    ServedProgram.stream yields a StatusMessage between the two answers' pieces (as
    dspy.streamify yields a status); the HTTP API sends a `restart` event."""
    import httpx
    from dspy.streaming import StatusMessage, StreamResponse

    from services.core.served_program import ServedProgram

    http_port = free_port()
    with OpenAIStandIn({"Peru": "Lima"}, input_field="country", output_field="capital") as api:
        router = start_router(bundle, runtime.target, "--threshold", "1.01", "--fallback-model",
                              "openai/gold", "--fallback-api-base", api.base_url,
                              "--http-port", str(http_port))  # fmt: skip
        try:
            with InferenceClient(runtime.target, timeout_s=60) as client:
                local = client.predict({"country": "Peru"}, include_raw_text=True)
            printed = subprocess.run(
                [sys.executable, "-m", "services.cli", "predict", "--target", router.target,
                 "--stream", "--input", "country=Peru"],
                cwd=REPO, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            items = list(ServedProgram(router.target).stream(country="Peru"))
            streamed = httpx.post(f"http://127.0.0.1:{http_port}/v1/predict", timeout=60,
                                  json={"inputs": {"country": "Peru"}, "stream": True})  # fmt: skip
        finally:
            router.terminate()
    local_value = sections(local.raw_text, {"capital"})["capital"]
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == f"capital: {local_value}\ncapital: Lima\n"
    assert "the router falls back to the API model (low_confidence)" in printed.stderr
    status = next(i for i, item in enumerate(items) if isinstance(item, StatusMessage))
    assert "falls back to the API model" in items[status].message
    before, after = items[:status], items[status + 1 : -1]
    assert all(isinstance(item, StreamResponse) for item in before + after)
    assert "".join(p.chunk for p in before) == local_value and before[-1].is_last_chunk
    assert "".join(p.chunk for p in after) == "Lima" == items[-1].capital
    events = [json.loads(line.removeprefix("data: ")) for line in streamed.text.splitlines()
              if line.startswith("data: {")]  # fmt: skip
    restart = next(e["restart"] for e in events if "restart" in e)
    assert restart == {"served_by": "SERVED_BY_FALLBACK", "reason": "low_confidence"}
    assert events[0]["delta"]["served_by"] == "SERVED_BY_LOCAL"
    assert events[-2]["delta"]["served_by"] == "SERVED_BY_FALLBACK"


def split_at_restart(chunks: list[pb.PredictChunk]) -> tuple[list, list]:
    """The deltas before the first restart, and the chunks from it on (the response left out)."""
    kinds = [c.WhichOneof("chunk") for c in chunks[:-1]]
    first = kinds.index("restart") if "restart" in kinds else len(kinds)
    return chunks[:first], chunks[first:-1]


@pytest.mark.parametrize("mode", ["cut", "error"])
def test_an_api_that_fails_while_the_router_streams_leaves_the_local_answer(
    bundle: Path, runtime: ServerProcess, mode: str
) -> None:
    """An API answer cut after its first piece went out is not retried: the router restarts
    back to the local model and sends its values again, whole; an API that fails before
    writing anything is retried and never restarts the stream. Both end with the local
    answer, degraded."""
    with OpenAIStandIn({"Peru": "Lima"}, input_field="country", output_field="capital",
                       mode=mode) as api:  # fmt: skip
        router = start_router(bundle, runtime.target, "--threshold", "1.01", "--fallback-model",
                              "openai/gold", "--fallback-api-base", api.base_url,
                              "--api-retries", "2", "--api-backoff-s", "0")  # fmt: skip
        try:
            with InferenceClient(router.target, timeout_s=60) as client:
                chunks = list(client.predict_stream({"country": "Peru"}))
        finally:
            router.terminate()
    final = chunks[-1].response
    assert final.served_by == pb.SERVED_BY_LOCAL and final.degraded
    assert final.route_reason == "low_confidence:api_error"
    local, after = split_at_restart(chunks)
    assert joined([*local, chunks[-1]]) == {("capitals", "capital"): final.outputs["capital"]}
    if mode == "error":
        assert after == [] and api.requests == 3
        return
    assert api.requests == 1  # text had gone out: not asked again
    kinds = [(c.WhichOneof("chunk"), getattr(c, c.WhichOneof("chunk")).served_by) for c in after]
    to_api = kinds.index(("restart", pb.SERVED_BY_FALLBACK))
    back = kinds.index(("restart", pb.SERVED_BY_LOCAL))
    assert to_api == 0 and back > 1  # some of the API's answer went out between
    assert joined([*after[1:back], chunks[-1]]) == {("capitals", "capital"): "Lim"}
    assert after[back].restart.reason == final.route_reason
    again = after[back + 1 :]
    assert joined([*again, chunks[-1]]) == {("capitals", "capital"): final.outputs["capital"]}
    assert all(c.delta.served_by == pb.SERVED_BY_LOCAL for c in again)


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
