"""The runtime over a real loopback gRPC server with the real SmolLM2-135M-Instruct GGUF."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.core.api import SERVICE_NAME, pb, pb_grpc
from services.core.client import InferenceClient, sampling
from testkit.processes import REPO, ServerProcess, free_port, start_runtime


@pytest.fixture(scope="module", params=[1, 4], ids=["serial", "batched"])
def runtime(
    request: pytest.FixtureRequest, gguf_path: Path, program_path: Path
) -> Iterator[ServerProcess]:
    """Every behaviour below holds one request at a time and with continuous batching."""
    server = start_runtime(
        "--model", str(gguf_path), "--program", str(program_path), "--n-ctx", "2048",
        "--max-queue", "4", "--max-tokens-limit", "512", "--parallel", str(request.param),
    )  # fmt: skip
    yield server
    server.terminate()


def stub(server: ServerProcess) -> pb_grpc.InferenceStub:
    return pb_grpc.InferenceStub(grpc.insecure_channel(server.target))


def test_generate_streams_pieces_then_usage(runtime: ServerProcess) -> None:
    with InferenceClient(runtime.target) as client:
        chunks = list(
            client.generate([("user", "Name three colours.")], max_tokens=24, temperature=0)
        )
    assert len(chunks) >= 3, "expected several streamed pieces"
    body, last = chunks[:-1], chunks[-1]
    assert all(c.text for c in body) and all(not c.HasField("usage") for c in body)
    assert last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert last.usage.prompt_tokens > 5
    assert 1 <= last.usage.completion_tokens <= 24
    assert last.time_to_first_token_ms <= last.latency_ms
    assert "".join(c.text for c in chunks).strip()


def test_generate_is_repeatable_greedy_and_with_a_seed(runtime: ServerProcess) -> None:
    """The second of two equal calls finds its whole prompt cached and the first little of
    it: the answer is the same (a one-token tail would be computed by another kernel)."""

    def run(prompt: str, **kw: float | int) -> str:
        with InferenceClient(runtime.target) as client:
            return "".join(c.text for c in client.generate([("user", prompt)], max_tokens=16, **kw))

    for prompt in ("Tell me a fact.", "Why is the sky blue?", "Name two rivers."):
        assert run(prompt, temperature=0) == run(prompt, temperature=0), prompt
    assert run("Tell me a fact.", temperature=1.0, seed=7) == run(
        "Tell me a fact.", temperature=1.0, seed=7
    )


def test_generate_takes_llama_cpps_sampling_options(runtime: ServerProcess) -> None:
    """top_k=1, or min_p=1, leaves only the likeliest token: any temperature and seed give the
    greedy text. A repeat penalty changes the greedy text of an answer that repeats itself."""

    def run(**kw: float | int) -> str:
        prompt = [("user", "List the numbers: 1, 1, 1, 1, 1, 1, 1,")]
        with InferenceClient(runtime.target) as client:
            return "".join(c.text for c in client.generate(prompt, max_tokens=24, **kw))

    greedy = run(temperature=0)
    assert greedy.count("1,") >= 5, greedy
    assert run(temperature=1.5, seed=3, top_k=1) == greedy
    assert run(temperature=1.5, seed=5, min_p=1.0) == greedy
    penalised = run(temperature=0, repeat_penalty=1.8)
    assert penalised.count("1,") < greedy.count("1,"), penalised
    for penalty in ({"frequency_penalty": 1.5}, {"presence_penalty": 2.0}):  # OpenAI's
        assert run(temperature=0, **penalty).count("1,") < greedy.count("1,"), penalty


def test_generate_stop_string_is_honoured(runtime: ServerProcess) -> None:
    with InferenceClient(runtime.target) as client:
        chunks = list(
            client.generate(
                [("user", "Count from 1 to 10, separated by commas.")],
                max_tokens=40,
                temperature=0,
                stop=["5"],
            )
        )
    text = "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE, text
    assert "5" not in text and "4" in text


def test_generate_gives_each_shown_tokens_log_probability(runtime: ServerProcess) -> None:
    """Asked for, every token whose text is shown comes with its log-probability and the
    likeliest tokens at its position: greedy, the token is the likeliest; the stop string's
    token is not listed; the same call without them lists none."""

    def run(**asked: bool | int) -> list[pb.GenerateChunk]:
        prompt = [("user", "Count from 1 to 10, separated by commas.")]
        with InferenceClient(runtime.target) as client:
            return list(client.generate(prompt, max_tokens=40, temperature=0, stop=["5"], **asked))

    chunks = run(logprobs=True, top_logprobs=3)
    listed = [item for chunk in chunks for item in chunk.logprobs]
    text = "".join(c.text for c in chunks)
    assert text.startswith("1, 2") and "5" not in text
    assert "".join(item.token.token for item in listed) == text
    assert len(listed) == chunks[-1].usage.completion_tokens - 1  # the stop's token: not shown
    for item in listed:
        top = [t.logprob for t in item.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert item.top_logprobs[0].token == item.token.token  # greedy: the likeliest
        assert item.token.HasField("id") and item.top_logprobs[0].id == item.token.id
        assert item.token.logprob == pytest.approx(top[0]) and top[0] <= 0
        assert sum(math.exp(value) for value in top) <= 1 + 1e-4
        assert item.token.bytes.decode() == item.token.token
    with InferenceClient(runtime.target) as client:  # the ids are the model's own
        assert client.detokenize([item.token.id for item in listed]) == text
    assert chunks[-1].stop_sequence == "5"  # which stop string ended it
    plain = run()
    assert "".join(c.text for c in plain) == text and not any(c.logprobs for c in plain)
    own_only = [item for c in run(logprobs=True) for item in c.logprobs]
    assert [i.token.logprob for i in own_only] == pytest.approx([i.token.logprob for i in listed])
    assert not any(item.top_logprobs for item in own_only)


def test_tokenize_gives_what_generate_prompts_and_detokenize_reverses_it(
    runtime: ServerProcess, gguf_path: Path
) -> None:
    """A chat's tokens are as many as Generate's prompt; a text's are llama-cpp-python's own
    (with the beginning-of-text token where the model adds one, or bare); each piece is its
    token's text, special tokens included, and Detokenize gives the text back."""
    import llama_cpp

    chat = [("user", "Name three colours.")]
    text = "The capital of Norway is Oslo."
    reference = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    with InferenceClient(runtime.target) as client:
        counted = client.tokenize(chat, with_pieces=True)
        generated = list(client.generate(chat, max_tokens=1, temperature=0))
        assert len(counted.tokens) == generated[-1].usage.prompt_tokens
        assert counted.context_length == 2048
        rendered = client.detokenize(counted.tokens)
        assert rendered.startswith("<|im_start|>") and "Name three colours." in rendered
        assert "".join(piece.token for piece in counted.pieces) == rendered
        assert list(client.tokenize(prompt=text).tokens) == reference.tokenize(text.encode())
        bare = client.tokenize(prompt=text, bare=True).tokens
        assert list(bare) == reference.tokenize(text.encode(), add_bos=False)
        assert client.detokenize(bare) == text
        with pytest.raises(grpc.RpcError) as caught:
            client.detokenize([bare[0], reference.n_vocab()])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("tokens[1]:")


def test_generate_json_schema_constrains_output(runtime: ServerProcess) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
    }
    with InferenceClient(runtime.target) as client:
        chunks = list(
            client.generate(
                [("user", "Give the largest city of Italy as JSON.")],
                max_tokens=60,
                temperature=0,
                json_schema=json.dumps(schema),
            )
        )
    value = json.loads("".join(c.text for c in chunks))
    assert isinstance(value["city"], str) and isinstance(value["population"], int)


def test_generate_follows_a_llama_cpp_grammar(runtime: ServerProcess) -> None:
    """Under a GBNF grammar every answer is in its language, sampled at a temperature that
    otherwise wanders off; a chat and a text completion alike."""
    grammar = 'root ::= ("yes" | "no") ", because " [a-z]{1,10} (" " [a-z]{1,10}){0,3} "."'
    shape = re.compile(r"(yes|no), because [a-z]{1,10}( [a-z]{1,10}){0,3}\.")
    with InferenceClient(runtime.target) as client:
        for seed in range(8):
            chat = "".join(c.text for c in client.generate(
                [("user", "Is water wet? Say why.")], max_tokens=64, temperature=1.5, seed=seed,
                grammar=grammar))  # fmt: skip
            assert shape.fullmatch(chat), chat
        text = "".join(
            c.text
            for c in client.generate(
                [], prompt="Is water wet?", max_tokens=64, temperature=1.5, seed=1, grammar=grammar
            )
        )
        assert shape.fullmatch(text), text
        with pytest.raises(grpc.RpcError) as caught:  # llama.cpp's parser says what is wrong
            list(client.generate([("user", "hi")], grammar='root ::= "yes" | no'))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Undefined rule identifier 'no'" in (caught.value.details() or "")


def test_generate_adds_a_logit_bias_as_llama_cpp_does(
    runtime: ServerProcess, gguf_path: Path
) -> None:
    """A token banned (-100) and one favoured (+5): greedy, llama-cpp-python's own completion
    with that `logit_bias`, one call at a time and batched."""
    import llama_cpp

    prompt = "My favourite fruits are"
    reference = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, verbose=False)
    free = reference.create_completion(prompt, max_tokens=10, temperature=0.0, repeat_penalty=1.0)
    first = reference.tokenize(free["choices"][0]["text"].encode(), add_bos=False)[0]
    bias = {first: -100.0, reference.tokenize(b" kiwi", add_bos=False)[0]: 5.0}
    expected = reference.create_completion(prompt, max_tokens=10, temperature=0.0,
                                           repeat_penalty=1.0, logit_bias=bias)  # fmt: skip
    reference.close()
    assert expected["choices"][0]["text"] != free["choices"][0]["text"]
    with InferenceClient(runtime.target) as client:
        chunks = client.generate([], prompt=prompt, max_tokens=10, temperature=0, logit_bias=bias)
        assert "".join(c.text for c in chunks) == expected["choices"][0]["text"]


def test_predict_parses_outputs_with_confidence(runtime: ServerProcess) -> None:
    with InferenceClient(runtime.target) as client:
        reply = client.predict({"country": "Germany"}, include_raw_text=True)
    assert reply.outcome == pb.PREDICT_OUTCOME_PARSED, reply.raw_text
    assert set(reply.outputs) == {"capital"}
    assert reply.outputs["capital"].strip()  # a 135M untuned model: the format, not the facts
    assert 0.0 < reply.confidence <= 1.0
    assert reply.served_by == pb.SERVED_BY_LOCAL
    assert reply.model_id and reply.usage.completion_tokens > 0 and reply.latency_ms > 0
    assert "[[ ## capital ## ]]" in reply.raw_text


def test_predict_truncated_output_is_a_distinct_outcome(runtime: ServerProcess) -> None:
    with InferenceClient(runtime.target) as client:  # one sampled token: the value is cut
        reply = client.predict({"country": "Spain"}, max_tokens=1)
    assert reply.outcome == pb.PREDICT_OUTCOME_TRUNCATED
    assert reply.confidence == 0.0 and not reply.outputs
    assert reply.raw_text  # what the model wrote is kept


def test_a_generate_between_predicts_does_not_cost_the_program_prefix(
    runtime: ServerProcess,
) -> None:
    with InferenceClient(runtime.target) as client:
        client.predict({"country": "France"})
        list(client.generate([("user", "Write a haiku about rivers.")], max_tokens=4))
        after = client.predict({"country": "Peru"})
    # The program's fixed prefix was restored from its saved state, not evaluated again.
    assert after.usage.cached_prompt_tokens > 50, after.usage


def test_the_program_prefix_is_evaluated_before_the_server_is_ready(
    gguf_path: Path, program_path: Path
) -> None:
    """One call at a time too: the first Predict finds the program's fixed prompt cached."""
    server = start_runtime("--model", str(gguf_path), "--program", str(program_path),
                           "--n-ctx", "2048", "--parallel", "1")  # fmt: skip
    try:
        with InferenceClient(server.target) as client:
            held = client.info().cached_prefix_tokens
            first = client.predict({"country": "Chile"})
        assert held > 50  # instructions, field structure and demos
        assert first.usage.cached_prompt_tokens >= held, first.usage
    finally:
        server.terminate()


def test_get_model_info(runtime: ServerProcess, gguf_path: Path) -> None:
    from services.core.bundle import sha256_file

    with InferenceClient(runtime.target) as client:
        info = client.info()
    assert info.gguf_sha256 == sha256_file(gguf_path)
    assert info.quantization == "Q4_1"
    assert info.context_length == 2048 and info.trained_context_length == 8192
    assert info.backend == "llama.cpp"
    assert [f.name for f in info.signature.input_fields] == ["country"]
    assert [f.name for f in info.signature.output_fields] == ["capital"]
    assert info.signature.output_fields[0].description == "its capital city"
    assert info.bundle_version == ""


def test_health_is_serving_and_reflection_lists_the_service(runtime: ServerProcess) -> None:
    channel = grpc.insecure_channel(runtime.target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert "edgedistill.v1.Inference" in names and "grpc.health.v1.Health" in names


BAD_REQUESTS = [
    ("missing input", "Predict", pb.PredictRequest(inputs={}), "inputs['country']"),
    (
        "unknown input",
        "Predict",
        pb.PredictRequest(inputs={"country": "Peru", "colour": "red"}),
        "inputs['colour']",
    ),
    (
        "input too long for the context",
        "Predict",
        pb.PredictRequest(inputs={"country": "land " * 1800}, options=sampling(max_tokens=400)),
        "inputs['country']",  # the longest input: the one to shorten
    ),
    (
        "max_tokens zero",
        "Predict",
        pb.PredictRequest(inputs={"country": "Peru"}, options=sampling(max_tokens=0)),
        "options.max_tokens",
    ),
    (
        "max_tokens over the limit",
        "Generate",
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="hi")], options=sampling(max_tokens=4096)
        ),
        "options.max_tokens",
    ),
    (
        "temperature out of range",
        "Generate",
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="hi")], options=sampling(temperature=7)
        ),
        "options.temperature",
    ),
    (
        "min_p over 1",
        "Generate",
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="hi")], options=sampling(min_p=1.5)
        ),
        "options.min_p",
    ),
    (
        "repeat_penalty zero",
        "Predict",
        pb.PredictRequest(inputs={"country": "Peru"}, options=sampling(repeat_penalty=0.0)),
        "options.repeat_penalty",
    ),
    (
        "temperature NaN",
        "Predict",
        pb.PredictRequest(inputs={"country": "Peru"}, options=sampling(temperature=float("nan"))),
        "options.temperature",
    ),
    (
        "invalid JSON schema",
        "Generate",
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="hi")], json_schema="{not json"
        ),
        "json_schema",
    ),
    (
        "a grammar llama.cpp cannot parse",
        "Generate",
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="hi")], grammar='root ::= "yes" | no'
        ),
        "grammar",
    ),
    (
        "a grammar with no root rule",
        "Generate",
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="hi")], grammar='answer ::= "yes"'
        ),
        "grammar",
    ),
    (
        "a grammar and a JSON schema",
        "Generate",
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="hi")],
            grammar='root ::= "{}"',
            json_schema='{"type": "object"}',
        ),
        "grammar",
    ),
    (
        "a logit bias for a token the model lacks",
        "Generate",
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="hi")], logit_bias={1 << 20: -100.0}
        ),
        f"logit_bias[{1 << 20}]",
    ),
    (
        "a logit bias over 100",
        "Generate",
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="hi")], logit_bias={42: 250.0}
        ),
        "logit_bias[42]",
    ),
    (
        "unknown role",
        "Generate",
        pb.GenerateRequest(messages=[pb.ChatMessage(role="wizard", content="hi")]),
        "messages[0].role",
    ),
    ("no messages", "Generate", pb.GenerateRequest(), "messages"),
    (
        "oversize request",
        "Predict",
        pb.PredictRequest(inputs={"country": "x" * (1 << 20)}),
        "inputs['country']",
    ),
    (
        "frequency penalty out of range",
        "Generate",
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="hi")],
            options=pb.SamplingOptions(frequency_penalty=2.5),
        ),
        "options.frequency_penalty",
    ),
    (
        "top_logprobs without logprobs",
        "Generate",
        pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")], top_logprobs=2),
        "top_logprobs",
    ),
    (
        "too many top_logprobs",
        "Generate",
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="hi")], logprobs=True, top_logprobs=21
        ),
        "top_logprobs",
    ),
    (
        "too many stop strings",
        "Generate",
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="hi")], stop=[str(i) for i in range(9)]
        ),
        "stop",
    ),
]


@pytest.mark.parametrize(
    ("method", "request_message", "field"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_input_is_invalid_argument_naming_the_field(
    runtime: ServerProcess, method: str, request_message: object, field: str
) -> None:
    client = stub(runtime)
    with pytest.raises(grpc.RpcError) as caught:
        if method == "Predict":
            client.Predict(request_message, timeout=30)
        else:
            list(client.Generate(request_message, timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert caught.value.details().startswith(field + ":"), caught.value.details()
    # ...and the server is fine afterwards.
    assert stub(runtime).GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model_name


def test_expired_deadline_then_next_call_is_served(runtime: ServerProcess) -> None:
    client = stub(runtime)
    request = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content="Write a long story about a robot.")],
        options=sampling(max_tokens=400, temperature=0),
    )
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        list(client.Generate(request, timeout=0.5))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The abandoned generation stops at once: the next call is not stuck behind 400 tokens.
    reply = client.Predict(pb.PredictRequest(inputs={"country": "Italy"}), timeout=20)
    assert reply.outcome == pb.PREDICT_OUTCOME_PARSED
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("parallel", ["1", "2"])
def test_a_chat_program_takes_its_history_as_json(
    gguf_path: Path, tmp_path: Path, parallel: str
) -> None:
    """A program with a dspy.History input serves (its fixed prefix rendered with an empty
    conversation): a request's turns are prompted before its question; text that is not a
    conversation is INVALID_ARGUMENT naming the field."""
    import dspy

    from services.core.program import ProgramSpec

    fields = {"question": (str, dspy.InputField()), "history": (dspy.History, dspy.InputField()),
              "answer": (str, dspy.OutputField())}  # fmt: skip
    chat = dspy.Signature(fields, "Answer, taking the conversation so far into account.")
    program = tmp_path / "program.json"
    program.write_text(ProgramSpec.from_signature(chat, name="chat").model_dump_json())
    server = start_runtime("--model", str(gguf_path), "--program", str(program),
                           "--n-ctx", "1024", "--parallel", parallel)  # fmt: skip
    turns = json.dumps([{"question": "My name is Ada.", "answer": "Hello Ada!"}])
    try:
        with InferenceClient(server.target) as client:
            reply = client.predict({"question": "What is my name?", "history": turns},
                                   max_tokens=24, include_raw_text=True)  # fmt: skip
            alone = client.predict({"question": "What is my name?", "history": "[]"},
                                   max_tokens=24)  # fmt: skip
            with pytest.raises(grpc.RpcError) as refused:
                client.predict({"question": "What is my name?", "history": "Ada"})
    finally:
        server.terminate()
    # The earlier turn is in the prompt: its user and assistant messages, with their markers.
    assert reply.usage.prompt_tokens > alone.usage.prompt_tokens + 20 and reply.raw_text
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs['history']: 'Ada' is not of type History" in str(refused.value.details())


def test_metrics_count_calls_and_tokens(gguf_path: Path, program_path: Path) -> None:
    metrics_port = free_port()
    server = start_runtime(
        "--model",
        str(gguf_path),
        "--program",
        str(program_path),
        "--n-ctx",
        "1024",
        "--metrics-port",
        str(metrics_port),
    )
    try:
        with InferenceClient(server.target) as client:
            client.predict({"country": "Chile"})
            with pytest.raises(grpc.RpcError):
                client.predict({})
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    finally:
        server.terminate()
    assert 'edgedistill_calls_total{code="OK",method="Predict"} 1.0' in text
    assert 'edgedistill_calls_total{code="INVALID_ARGUMENT",method="Predict"} 1.0' in text
    assert 'edgedistill_tokens_total{direction="completion"}' in text
    assert "edgedistill_queue_depth" in text
    # Request contents are not logged by default.
    assert "Chile" not in server.stderr


def test_every_kv_cache_type_the_setting_takes_is_a_ggml_type() -> None:
    """The setting's names (the core's `KvCacheType`) are the one list; each maps to ggml's
    type of its name, and nothing else is taken."""
    from typing import get_args

    import llama_cpp

    from services.core.config import KvCacheType
    from services.runtime.backends.llamacpp import kv_cache_ggml_type

    types = {name: kv_cache_ggml_type(name) for name in get_args(KvCacheType)}
    assert types["f16"] == llama_cpp.GGML_TYPE_F16 and types["q8_0"] == llama_cpp.GGML_TYPE_Q8_0
    assert len(set(types.values())) == len(types)
    with pytest.raises(ValueError, match="unknown KV cache type 'q3_k'"):
        kv_cache_ggml_type("q3_k")


@pytest.mark.parametrize("parallel", ["1", "2"])
def test_a_quantized_kv_cache_answers_as_llama_cpp_does_with_it(
    gguf_path: Path, program_path: Path, parallel: str
) -> None:
    """`--kv-cache-type q8_0` (llama.cpp's --cache-type-k/-v): greedy text is llama-cpp-python's
    own under the same cache, which is not its f16 text for this prompt; Predict, whose
    program prefix is kept as saved cache state, still parses."""
    import llama_cpp

    chat = [{"role": "user", "content": "Write a short poem about the sea."}]

    def reference(**cache: object) -> str:
        llm = llama_cpp.Llama(str(gguf_path), n_ctx=1024, verbose=False, **cache)
        answer = llm.create_chat_completion(chat, max_tokens=40, temperature=0)
        llm.close()
        return str(answer["choices"][0]["message"]["content"])

    quantized = reference(type_k=llama_cpp.GGML_TYPE_Q8_0, type_v=llama_cpp.GGML_TYPE_Q8_0,
                          flash_attn=True)  # fmt: skip
    assert quantized != reference()  # the cache type shows in this prompt's greedy text
    server = start_runtime("--model", str(gguf_path), "--program", str(program_path),
                           "--n-ctx", "1024", "--parallel", parallel,
                           "--kv-cache-type", "q8_0")  # fmt: skip
    try:
        with InferenceClient(server.target) as client:
            pieces = client.generate([("user", chat[0]["content"])], max_tokens=40,
                                     temperature=0)  # fmt: skip
            assert "".join(piece.text for piece in pieces) == quantized
            for country in ("France", "Japan"):  # the second restores the prefix's state
                reply = client.predict({"country": country})
                assert reply.outcome == pb.PREDICT_OUTCOME_PARSED
    finally:
        server.terminate()


@pytest.mark.parametrize("parallel", [1, 2])
def test_full_queue_is_resource_exhausted(gguf_path: Path, parallel: int) -> None:
    server = start_runtime(
        "--model", str(gguf_path), "--n-ctx", "1024", "--max-queue", "1",
        "--parallel", str(parallel),
    )  # fmt: skip
    try:
        long_request = pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="Write a long story about a cat.")],
            options=sampling(max_tokens=300, temperature=0),
        )
        results: list[str] = []

        def consume(first: threading.Event) -> None:
            for _ in stub(server).Generate(long_request, timeout=60):
                first.set()
            results.append("done")

        # `parallel` calls decode at once...
        started_events = [threading.Event() for _ in range(parallel)]
        running = [threading.Thread(target=consume, args=(e,)) for e in started_events]
        for thread in running:
            thread.start()
        assert all(e.wait(30) for e in started_events)
        # ...one more may wait (max_queue=1), the next is refused.
        queued = stub(server).Generate(long_request, timeout=60)  # waits in the queue
        time.sleep(0.3)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            list(stub(server).Generate(long_request, timeout=60))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started < 2, "rejected at once, not after waiting"
        queued.cancel()
        for thread in running:
            thread.join(60)
        assert results == ["done"] * parallel
    finally:
        server.terminate()


@pytest.mark.parametrize("parallel", [1, 2])
def test_sigterm_drains_an_in_flight_call(gguf_path: Path, parallel: int) -> None:
    server = start_runtime(
        "--model", str(gguf_path), "--n-ctx", "1024", "--parallel", str(parallel)
    )
    channel = grpc.insecure_channel(server.target)
    request = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content="Write a long story about a dog.")],
        options=sampling(max_tokens=120, temperature=0),
    )
    chunks: list[pb.GenerateChunk] = []
    got_first = threading.Event()

    def consume() -> None:
        for chunk in pb_grpc.InferenceStub(channel).Generate(request, timeout=60):
            chunks.append(chunk)
            got_first.set()

    statuses: list[int] = []
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)

    def watch_health() -> None:
        try:
            for reply in watch:
                statuses.append(reply.status)
        except grpc.RpcError:
            pass

    watcher = threading.Thread(target=watch_health)
    watcher.start()
    reader = threading.Thread(target=consume)
    reader.start()
    assert got_first.wait(30)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(grpc.RpcError):  # no new calls once draining
        stub(server).Predict(pb.PredictRequest(inputs={}), timeout=5)
    reader.join(60)
    assert server.proc.wait(60) == 0
    watcher.join(10)
    # The in-flight call finished in full...
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == 120
    # ...and health went from SERVING to NOT_SERVING.
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    assert statuses[0] == serving and not_serving in statuses, statuses


def test_serves_a_bundle_and_refuses_a_tampered_one(tmp_path: Path, gguf_path: Path) -> None:
    from testkit.bundles import CAPITALS_PROGRAM, make_bundle

    bundle = make_bundle(tmp_path / "bundle", gguf_path, CAPITALS_PROGRAM)
    server = start_runtime("--bundle", str(bundle), "--n-ctx", "1024")
    try:
        with InferenceClient(server.target) as client:
            info = client.info()
            reply = client.predict({"country": "Egypt"})
        assert info.bundle_version == "2026.11.29-1" and info.model_name == "capitals"
        assert reply.outcome == pb.PREDICT_OUTCOME_PARSED
    finally:
        server.terminate()

    program = bundle / "program" / "program.json"
    program.write_text(program.read_text().replace("capital city", "capital town"))
    failed = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "--bundle", str(bundle), "--port", "0",
         "--metrics-port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert failed.returncode == 3
    assert "program/program.json" in failed.stderr and "sha256" in failed.stderr
