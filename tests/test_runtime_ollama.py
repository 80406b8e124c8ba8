"""The runtime's Ollama backend, against an Ollama API STAND-IN (tests/ollama_standin.py).

No Ollama server can run on this machine; the stand-in speaks Ollama's documented HTTP API and
answers with the real SmolLM2 GGUF through llama.cpp.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.core.api import pb, pb_grpc
from services.core.bundle import sha256_file
from services.core.client import InferenceClient
from testkit.processes import REPO, ServerProcess, start_runtime


@pytest.fixture(scope="module")
def ollama_standin(gguf_path: Path) -> Iterator[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "testkit.ollama_standin",
            "--model",
            str(gguf_path),
            "--name",
            "smol",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening on" in line, line
    yield "http://" + line.rsplit(" ", 1)[1].strip()
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def ollama_runtime(ollama_standin: str, program_path: Path) -> Iterator[ServerProcess]:
    server = start_runtime(
        "--backend", "ollama", "--ollama-host", ollama_standin, "--ollama-model", "smol",
        "--program", str(program_path), "--n-ctx", "2048",
    )  # fmt: skip
    yield server
    server.terminate()


def test_ollama_backend_model_info(ollama_runtime: ServerProcess, gguf_path: Path) -> None:
    with InferenceClient(ollama_runtime.target) as client:
        info = client.info()
    assert info.backend == "ollama"
    assert info.model_name == "smol" and info.quantization == "Q4_1"
    assert info.gguf_sha256 == sha256_file(gguf_path)  # from the Modelfile's blob digest
    assert [f.name for f in info.signature.output_fields] == ["capital"]
    assert info.embedding_length == 576 and info.embedding_pooling == ""  # as Ollama shows it


def test_ollama_backend_predict(ollama_runtime: ServerProcess) -> None:
    with InferenceClient(ollama_runtime.target) as client:
        reply = client.predict({"country": "Germany"}, include_raw_text=True)
    assert reply.outcome == pb.PREDICT_OUTCOME_PARSED, reply.raw_text
    assert reply.outputs["capital"].strip()
    assert 0.0 < reply.confidence <= 1.0
    assert reply.usage.completion_tokens > 0


def test_ollama_backend_generate_streams(ollama_runtime: ServerProcess) -> None:
    with InferenceClient(ollama_runtime.target) as client:
        chunks = list(client.generate([("user", "Name a fruit.")], max_tokens=12, temperature=0))
    assert len(chunks) >= 2
    assert chunks[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert 1 <= chunks[-1].usage.completion_tokens <= 12
    assert "".join(c.text for c in chunks).strip()
    with InferenceClient(ollama_runtime.target) as client:  # Ollama's own log-probabilities
        listed = [item for c in client.generate([("user", "Name a fruit.")], max_tokens=12,
                                                temperature=0, logprobs=True, top_logprobs=2)
                  for item in c.logprobs]  # fmt: skip
    assert "".join(item.token.token for item in listed) == "".join(c.text for c in chunks)
    assert all(len(item.top_logprobs) == 2 and item.token.logprob <= 0 for item in listed)
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(ollama_runtime.target))  # chats only
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(pb.GenerateRequest(prompt="Once")))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt: the ollama backend serves chats" in (caught.value.details() or "")
    with InferenceClient(ollama_runtime.target) as client, pytest.raises(grpc.RpcError) as caught:
        client.tokenize([("user", "Name a fruit.")])
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "does not expose its model's tokenizer" in (caught.value.details() or "")
    with InferenceClient(ollama_runtime.target) as client, pytest.raises(grpc.RpcError) as caught:
        list(client.generate([("user", "Yes?")], grammar='root ::= "yes"'))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert (caught.value.details() or "").startswith("grammar: Ollama's API takes JSON schemas")
    with InferenceClient(ollama_runtime.target) as client, pytest.raises(grpc.RpcError) as caught:
        list(client.generate([("user", "Yes?")], logit_bias={42: -100.0}))  # ids are its own
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_ollama_backend_embeds_through_ollamas_api(
    ollama_runtime: ServerProcess, gguf_path: Path
) -> None:
    """Embed asks Ollama's /api/embed, one text a call (so each text's tokens are counted),
    and passes on what Ollama refuses."""
    import llama_cpp
    import numpy as np

    texts = ["The cat sat on the mat.", "Stock markets fell."]
    reference = llama_cpp.Llama(str(gguf_path), embedding=True, n_ctx=512, n_batch=512,
                                n_ubatch=512, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                                verbose=False)  # fmt: skip
    with InferenceClient(ollama_runtime.target) as client:
        reply = client.embed(texts)
        given = np.array([list(item.values) for item in reply.embeddings])
        assert np.abs(given - np.array(reference.embed(texts, normalize=True))).max() < 1e-5
        assert [item.tokens for item in reply.embeddings] == [
            len(reference.tokenize(text.encode())) for text in texts]  # fmt: skip
        assert reply.pooling == "" and reply.usage.prompt_tokens > 0
        for asked, code, said in (
            ({"truncate": False}, grpc.StatusCode.INVALID_ARGUMENT, "inputs[0]: Ollama refused"),
            ({"normalize": False}, grpc.StatusCode.UNIMPLEMENTED, "normalize: Ollama's"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                client.embed(["word " * 600], **asked)  # type: ignore[arg-type]
            assert caught.value.code() == code
            assert (caught.value.details() or "").startswith(said)


def test_ollama_unreachable_is_a_clear_start_failure(program_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable, "-m", "services.cli", "serve", "--backend", "ollama",
            "--ollama-host", "http://127.0.0.1:9", "--ollama-model", "smol",
            "--program", str(program_path), "--port", "0", "--metrics-port", "0",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 3
    assert "cannot serve" in proc.stderr and "Ollama" in proc.stderr


def test_an_ollama_server_is_a_teacher_at_its_root_url(
    ollama_standin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`teacher: {model: ollama_chat/NAME, api_base: http://host:11434}`, as DSPy's docs write
    it: DSPy 3.4 calls Ollama's OpenAI-compatible API, under `/v1`, which the root is given."""
    import dspy

    from services.builder.metrics import exact_match
    from services.builder.pipeline import load_program
    from services.builder.spec import TeacherSpec
    from services.builder.teacher import collect_traces
    from services.core.lm_connection import api_base_for, litellm_connection

    assert api_base_for("ollama_chat/llama3", "http://h:11434/") == "http://h:11434/v1"
    # LiteLLM's own call (the router's streamed Generate) reaches Ollama's native API, the root
    assert litellm_connection("ollama_chat/llama3", "http://h:11434/v1", None) == {
        "api_base": "http://h:11434", "api_key": "EMPTY"}  # fmt: skip
    assert api_base_for("ollama/llama3", "http://h:11434/v1") == "http://h:11434/v1"
    assert api_base_for("openai/gpt", "http://h:8000") == "http://h:8000"
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    rows = [{"ticket": "VPN drops every hour", "category": "network"},
            {"ticket": "Printer jams on page two", "category": "hardware"}]  # fmt: skip
    trainset = [dspy.Example(**row).with_inputs("ticket") for row in rows]
    teacher = TeacherSpec(model="ollama_chat/smol", api_base=ollama_standin,
                          max_failure_fraction=1.0, max_tokens=48)  # fmt: skip
    counts = collect_traces(
        program=load_program("examples.ticket_triage.program:build"), teacher=teacher,
        trainset=trainset, metric=exact_match, threshold=1.0, output_names=["category"],
        out_dir=tmp_path, require_kept=False,
    )  # fmt: skip
    assert counts.total == 2
    # Every call was answered by the model (the untuned one may answer off its labels, which
    # DSPy's parser refuses); none failed to reach it.
    failed = (tmp_path / "failed.jsonl").read_text().splitlines()
    errors = [json.loads(line)["error"] for line in failed]
    assert all(e.startswith("AdapterParseError") for e in errors), errors
