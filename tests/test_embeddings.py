"""Embeddings: the translations and checks as pure functions, then a real runtime (continuous
batching on) and a router in front of it answering Embed over gRPC, OpenAI's and Ollama's HTTP
APIs, `dspy.Embedder` and the CLI with llama-cpp-python's own `Llama.embed` vectors."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from services.core import validation as check
from services.core.api import pb
from services.core.client import InferenceClient
from services.core.http_api import embeddings as http
from services.core.http_api.chat import BadRequest
from services.core.validation import RpcFailure
from services.runtime.backends.embeddings import fit, normalized, packed, pooling_of
from testkit.bundles import CAPITALS_PROGRAM, make_bundle
from testkit.processes import REPO, ServerProcess, free_port, start_router, start_runtime

EMBED_CTX = 64  # the runtime's --embed-ctx: a text of more tokens is cut or refused
MAX_REQUEST_BYTES = 16384  # the runtime's: the deadline test's 40 texts fit in it
TEXTS = ["The cat sat on the mat.", "A cat is sitting on a mat.",
         "Stock markets fell sharply today."]  # fmt: skip


def test_pooling_is_the_ggufs_own_else_the_mean() -> None:
    assert pooling_of({"general.architecture": "llama"}) == 1  # a generative model: mean
    assert pooling_of({"general.architecture": "bert", "bert.pooling_type": 2}) == 2  # cls
    assert pooling_of({"general.architecture": "llama", "llama.pooling_type": 0}) == 1  # none
    assert fit([1, 2, 3], 3, False, "inputs[0]") == ([1, 2, 3], False)
    assert fit([1, 2, 3, 4], 3, True, "inputs[0]") == ([1, 2, 3], True)
    with pytest.raises(ValueError, match=r"^inputs\[2\]: 4 tokens exceed the context of 3"):
        fit([1, 2, 3, 4], 3, False, "inputs[2]")
    assert packed([3, 2, 2, 3, 1], 5, 8) == [[0, 1], [2, 3], [4]]  # decoded together
    assert packed([1, 1, 1], 5, 2) == [[0, 1], [2]] and packed([5, 5], 5, 8) == [[0], [1]]
    assert packed([7, 1, 1], 5, 8) == [[0], [1, 2]]  # a text over the limit goes alone
    assert np.allclose(normalized(np.array([3.0, 4.0])), [0.6, 0.8])
    assert not normalized(np.zeros(2)).any()


def test_embed_requests_are_checked_by_field() -> None:
    def refusal(request: pb.EmbedRequest) -> str:
        with pytest.raises(RpcFailure) as caught:
            check.embed_inputs(request)
        return caught.value.message

    assert check.embed_inputs(pb.EmbedRequest(inputs=["a", "b"])) == ["a", "b"]
    assert refusal(pb.EmbedRequest()).startswith("inputs: give at least one text")
    assert refusal(pb.EmbedRequest(inputs=["a", " "])).startswith("inputs[1]: is empty")
    assert "at most 2048" in refusal(pb.EmbedRequest(inputs=["a"] * 2049))
    with pytest.raises(RpcFailure, match=r"^inputs\[1\]: the request is \d+ bytes, over"):
        check.check_size(pb.EmbedRequest(inputs=["a", "b" * 500, "c"]), 100)


def test_openai_and_ollama_bodies_become_embed_calls_and_answers() -> None:
    assert http.openai_call(http.OpenAIBody(input="hi")).inputs == ["hi"]
    with pytest.raises(BadRequest, match="token arrays"):
        http.openai_call(http.OpenAIBody(input=[[1, 2]]))
    assert http.in_openai_terms("inputs[1]: is empty") == "input[1]: is empty"
    assert http.in_prompt_terms("inputs[0]: is empty") == "prompt: is empty"
    reply = pb.EmbedResponse(embeddings=[pb.Embedding(values=[0.5, -0.25], tokens=3)],
                             usage=pb.Usage(prompt_tokens=3))  # fmt: skip
    floats = http.openai_answer(reply, http.OpenAIBody(input="hi"), "m")
    assert floats["data"] == [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}]
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    packed = http.openai_answer(reply, http.OpenAIBody(input="hi", encoding_format="base64"), "m")
    raw = base64.b64decode(packed["data"][0]["embedding"])
    assert struct.unpack("<2f", raw) == (0.5, -0.25)  # little-endian float32, as OpenAI's
    with pytest.raises(BadRequest, match="2 dimensions"):
        http.openai_answer(reply, http.OpenAIBody(input="hi", dimensions=8), "m")
    with pytest.raises(BadRequest, match="2 dimensions"):
        http.ollama_answer(reply, http.OllamaBody(model="m", input="hi", dimensions=1), 0.0)
    assert http.ollama_answer(reply, http.OllamaBody(model="m", dimensions=2), 0.0)[
        "embeddings"] == [[0.5, -0.25]]  # fmt: skip
    assert http.ollama_call(http.OllamaBody(model="m", input=[])) is None  # Ollama's "load"
    call = http.ollama_call(http.OllamaBody(model="m", input="hi"))
    assert call is not None and call.truncate and list(call.inputs) == ["hi"]
    legacy = http.ollama_legacy_call(http.OllamaLegacyBody(model="m", prompt="hi"))
    assert legacy is not None and legacy.HasField("normalize") and not legacy.normalize
    assert http.ollama_legacy_answer(None, http.OllamaLegacyBody(model="m"), 0.0) == {
        "embedding": []
    }


# -- a real runtime and router ----------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(gguf_path: Path) -> Any:
    """llama-cpp-python's own embedding model over the same GGUF (mean pooling)."""
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(gguf_path), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        n_ctx=EMBED_CTX, n_batch=EMBED_CTX, n_ubatch=EMBED_CTX, flash_attn=True, verbose=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def served(
    gguf_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, int, ServerProcess, int]]:
    """A batching runtime and a router in front of it, both with the HTTP API."""
    runtime_http, router_http = free_port(), free_port()
    runtime = start_runtime(
        "--model", str(gguf_path), "--n-ctx", "512", "--parallel", "2",
        "--embed-ctx", str(EMBED_CTX), "--http-port", str(runtime_http),
        "--max-request-bytes", str(MAX_REQUEST_BYTES),
    )  # fmt: skip
    bundle = make_bundle(tmp_path_factory.mktemp("bundle"), gguf_path, CAPITALS_PROGRAM,
                         threshold=0.5)  # fmt: skip
    try:
        router = start_router(bundle, runtime.target, "--http-port", str(router_http))
        yield runtime, runtime_http, router, router_http
        router.terminate()
    finally:
        runtime.terminate()


def vectors(reply: pb.EmbedResponse) -> np.ndarray:
    return np.array([list(item.values) for item in reply.embeddings])


def test_embed_gives_llama_cpps_own_vectors_beside_a_running_generation(
    served: tuple[ServerProcess, int, ServerProcess, int], reference: Any
) -> None:
    """Each text's vector is llama-cpp-python's `Llama.embed` of it, unit length or raw; a
    generation running meanwhile answers what it answers alone."""
    runtime = served[0]
    expected = np.array([reference.embed(text, normalize=True) for text in TEXTS])
    raw = np.array(reference.embed(TEXTS[0], normalize=False))
    question = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content="Count from one to twenty.")],
        options=pb.SamplingOptions(max_tokens=48, temperature=0),
    )
    with InferenceClient(runtime.target) as client:
        alone = "".join(chunk.text for chunk in client.stub.Generate(question))
        generated: list[str] = []
        beside = threading.Thread(target=lambda: generated.extend(
            chunk.text for chunk in client.stub.Generate(question)))  # fmt: skip
        beside.start()
        replies = [client.embed(TEXTS) for _ in range(3)]
        beside.join()
        unnormalized = client.embed(TEXTS[:1], normalize=False)
        info = client.info()
    assert "".join(generated) == alone
    assert info.embedding_length == expected.shape[1] and info.embedding_pooling == "mean"
    for reply in replies:
        assert np.abs(vectors(reply) - expected).max() < 1e-5
        assert reply.pooling == "mean" and reply.model_id
        assert [item.tokens for item in reply.embeddings] == [
            len(reference.tokenize(text.encode())) for text in TEXTS]  # fmt: skip
        assert reply.usage.prompt_tokens == sum(item.tokens for item in reply.embeddings)
    assert np.abs(vectors(unnormalized)[0] - raw).max() < 1e-4 * np.linalg.norm(raw)
    similar, unrelated = expected[0] @ expected[1], expected[0] @ expected[2]
    assert similar > unrelated  # the vectors carry the texts' meaning


def test_the_one_at_a_time_backend_embeds_the_same_and_stops_when_told(
    gguf_path: Path, reference: Any
) -> None:
    from services.runtime.backends.embeddings import EmbeddingCancelled, run_steps
    from services.runtime.backends.llamacpp import LlamaCppBackend

    expected = np.array([reference.embed(text, normalize=True) for text in TEXTS])
    backend = LlamaCppBackend(gguf_path, n_ctx=512, n_threads=2, embed_ctx=EMBED_CTX)
    try:
        given = run_steps(backend.embed(TEXTS, truncate=False, normalize=True,
                                        should_stop=lambda: False))  # fmt: skip
        assert np.abs(np.array([item.values for item in given]) - expected).max() < 1e-5
        asked = iter([False, True])  # the first text, then the call is cancelled
        long = ["word " * (EMBED_CTX // 2)] * 3  # too long to be decoded together
        with pytest.raises(EmbeddingCancelled):
            run_steps(backend.embed(long, truncate=False, normalize=True,
                                    should_stop=lambda: next(asked)))  # fmt: skip
    finally:
        backend.close()


def test_a_text_longer_than_the_embedding_context_is_refused_or_cut(
    served: tuple[ServerProcess, int, ServerProcess, int], reference: Any
) -> None:
    long = "word " * (EMBED_CTX + 20)
    with InferenceClient(served[0].target) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.embed(["short", long])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (caught.value.details() or "").startswith(
            f"inputs[1]: {len(reference.tokenize(long.encode()))} tokens exceed the context "
            f"of {EMBED_CTX}")  # fmt: skip
        cut = client.embed(["short", long], truncate=True)
        for bad, field in (([], "inputs"), (["a", ""], "inputs[1]")):
            with pytest.raises(grpc.RpcError) as caught:
                client.embed(bad)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (caught.value.details() or "").startswith(f"{field}:")
    assert [item.truncated for item in cut.embeddings] == [False, True]
    assert cut.embeddings[1].tokens == EMBED_CTX
    first = reference.tokenize(long.encode())[:EMBED_CTX]
    assert np.abs(vectors(cut)[1] - reference.embed(reference.detokenize(first).decode(),
                                                    normalize=True)).max() < 1e-5  # fmt: skip


def test_a_call_past_its_deadline_stops_embedding_and_the_next_is_served(
    served: tuple[ServerProcess, int, ServerProcess, int],
) -> None:
    """40 texts that each fill the embedding context take seconds; past a short deadline the
    embedding thread stops between two of them, so the next call is not kept waiting."""
    many = pb.EmbedRequest(inputs=["word " * (EMBED_CTX - 4)] * 40)
    with InferenceClient(served[0].target) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.Embed(many, timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        reply = client.stub.Embed(pb.EmbedRequest(inputs=TEXTS[:1]), timeout=5)
    assert len(reply.embeddings) == 1


def test_openai_ollama_and_dspy_clients_get_the_same_vectors_from_runtime_and_router(
    served: tuple[ServerProcess, int, ServerProcess, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # offline: no price list fetch
    import dspy
    import httpx
    import ollama
    import openai

    runtime, runtime_http, router, router_http = served
    with InferenceClient(runtime.target) as client:
        expected = vectors(client.embed(TEXTS))
        raw = vectors(client.embed(TEXTS[:1], normalize=False))[0]
    with InferenceClient(router.target) as client:  # the router hands Embed to a runtime
        assert np.array_equal(vectors(client.embed(TEXTS)), expected)
    for port in (runtime_http, router_http):
        base = f"http://127.0.0.1:{port}"
        api = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
        answer = api.embeddings.create(model="edge", input=TEXTS)  # asked for as base64
        floats = api.embeddings.create(model="edge", input=TEXTS, encoding_format="float")
        for given in (answer, floats):
            assert np.array_equal(np.array([d.embedding for d in given.data]), expected)
        assert answer.usage.prompt_tokens > len(TEXTS)
        embedder = dspy.Embedder("openai/edge", api_base=f"{base}/v1", api_key="none",
                                 caching=False)  # fmt: skip
        assert np.allclose(np.array(embedder(TEXTS)), expected, atol=1e-6)
        local = ollama.Client(host=base)
        name = local.list().models[0].model
        assert np.array_equal(np.array(local.embed(model=name, input=TEXTS).embeddings), expected)
        assert np.allclose(local.embeddings(model=name, prompt=TEXTS[0]).embedding, raw)
        empty = httpx.post(f"{base}/v1/embeddings", json={"input": ["a", ""]}).json()
        assert empty["error"]["param"] == "input[1]" and "empty" in empty["error"]["message"]
        unknown = httpx.post(f"{base}/api/embed", json={"model": "nope", "input": "a"})
        assert unknown.status_code == 404 and "not found" in unknown.json()["error"]
    big = "word " * MAX_REQUEST_BYTES  # the runtime's size check names each route's field
    for route, body, field in (
        ("/v1/embeddings", {"input": ["a", big]}, "input[1]"),
        ("/api/embed", {"model": name, "input": big}, "input[0]"),
        ("/api/embeddings", {"model": name, "prompt": big}, "prompt"),
    ):
        refused = httpx.post(f"http://127.0.0.1:{runtime_http}{route}", json=body, timeout=30)
        error = refused.json()["error"]
        assert refused.status_code == 400, error
        assert (error if isinstance(error, str) else error["message"]).startswith(
            f"{field}: the request is ")  # fmt: skip


def test_the_cli_prints_one_vector_per_line(
    served: tuple[ServerProcess, int, ServerProcess, int],
) -> None:
    target = served[0].target
    with InferenceClient(target) as client:
        expected = vectors(client.embed(TEXTS))
    printed = subprocess.run(
        [sys.executable, "-m", "services.cli", "embed", "-", "--target", target],
        input="\n".join(TEXTS) + "\n", cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert np.array_equal(np.array([json.loads(line) for line in lines]), expected)
    assert "3 vectors of 576 (mean pooling)" in printed.stderr


def test_side_work_cancelled_during_its_last_step_leaves_the_worker_serving() -> None:
    """A caller may cancel while its work's last step runs on the model's thread; the
    worker must still answer it and keep serving (answering a cancelled future raises)."""
    from collections.abc import Generator

    from services.runtime.scheduler import Scheduler

    scheduler = Scheduler(object(), max_queue=1)  # type: ignore[arg-type]  # nothing generates
    scheduler.wait_ready()
    stepping, release = threading.Event(), threading.Event()

    def last_step() -> Generator[None, None, str]:
        stepping.set()
        release.wait(5)
        return "finished"
        yield  # a generator, of one step

    def quick() -> Generator[None, None, str]:
        return "served"
        yield

    try:
        running = scheduler.submit_steps(last_step())
        assert stepping.wait(5)
        running.cancel()  # too late: it runs
        release.set()
        assert running.result(5) == "finished"
        assert scheduler.submit_steps(quick()).result(5) == "served"
    finally:
        scheduler.close(5)
