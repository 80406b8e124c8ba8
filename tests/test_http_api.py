"""The HTTP API: the request translations as pure functions, then a real runtime (and a
router in front of it) answering the `openai` client, `dspy.LM` and plain JSON over HTTP
exactly as Generate and Predict answer over gRPC, with the same token, limits and errors."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import ANY

import grpc
import pytest

from services.core.api import pb, pb_grpc
from services.core.client import InferenceClient
from services.core.http_api import chat as http
from services.core.http_api import ollama as ollama_api
from services.core.http_api import responses
from services.core.http_api.predict import predict_answer, predict_request
from services.core.security import token_metadata
from testkit.bundles import CAPITALS_PROGRAM, make_bundle
from testkit.processes import ServerProcess, free_port, start_router, start_runtime

TOKEN = "edge-secret"
QUESTION = [{"role": "user", "content": "Name three colours."}]


def test_a_bad_body_names_the_parameter_as_openai_does() -> None:
    cases = {
        b'{"messages": []}': "messages",
        b'{"messages": [{"role": "tool", "content": "x"}]}': "messages.0.role",
        b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}': "messages.0",
        b'{"messages": [{"role": "user", "content": "x"}], "n": 17}': "n",
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": 3}': "temperature",
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}': "max_tokens",
        b"not json": "body",
    }
    for raw, param in cases.items():
        with pytest.raises(http.BadRequest) as caught:
            http.parse_request(raw)
        assert caught.value.param.startswith(param), (raw, caught.value.param)
    tools = http.parse_request(b'{"messages": [{"role": "user", "content": "x"}], "tools": [{}]}')
    with pytest.raises(http.BadRequest, match="tools"):
        http.generate_request(tools)


def test_a_predict_body_is_the_protos_json_with_inputs_of_any_json_type() -> None:
    body = (b'{"inputs": {"ticket": "VPN", "tags": ["a", 1], "n": 3},'
            b' "options": {"max_tokens": 8}, "include_raw_text": true}')  # fmt: skip
    call, stream = predict_request(body)
    assert not call.inputs  # typed, as sent: the server reads each by its field's type
    assert json.loads(call.inputs_json) == {"ticket": "VPN", "tags": ["a", 1], "n": 3}
    assert call.options.max_tokens == 8 and call.include_raw_text and not stream
    assert predict_request(b'{"inputs": {}, "stream": true}')[1]
    for raw, param in ((b'{"input": {}}', "inputs"), (b"[1]", "inputs"), (b"{", "body"),
                       (b'{"inputs": {}, "options": {"max_tokens": "x"}}', "body"),
                       (b'{"inputs": {}, "stream": "yes"}', "stream")):  # fmt: skip
        with pytest.raises(http.BadRequest) as caught:
            predict_request(raw)
        assert caught.value.param == param, raw


def test_a_predict_answers_outputs_in_the_signatures_order() -> None:
    """A proto map has no order: the JSON answer lists `outputs` as `outputs_json` does (the
    signature's order), then any other field."""
    names = ["store", "total", "items", "payment", "zeta", "alpha"]
    reply = pb.PredictResponse(outputs={n: "1" for n in [*names, "extra"]},
                               outputs_json=json.dumps({n: 1 for n in names}))  # fmt: skip
    body = predict_answer(reply)
    assert list(body["outputs"]) == [*names, "extra"] and list(body["outputs_json"]) == names


def test_a_chat_request_becomes_the_generate_call_it_asks_for() -> None:
    body = {
        "model": "anything", "stop": "END", "max_completion_tokens": 9, "temperature": 0.2,
        "seed": 7, "top_k": 5, "logprobs": True, "top_logprobs": 3, "user": "u1",  # ignored
        "frequency_penalty": 0.5, "presence_penalty": -0.25,
        "messages": [{"role": "developer", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "a"},
                                                  {"type": "text", "text": "b"}]}],
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "x", "schema": {"type": "integer"}}},
    }  # fmt: skip
    call = http.generate_request(http.parse_request(json.dumps(body).encode()))
    assert [(m.role, m.content) for m in call.messages] == [("system", "Be brief."), ("user", "ab")]
    assert list(call.stop) == ["END"] and json.loads(call.json_schema) == {"type": "integer"}
    assert call.options.max_tokens == 9 and call.options.seed == 7 and call.options.top_k == 5
    assert call.options.temperature == pytest.approx(0.2)
    assert not call.options.HasField("top_p")  # unset: the server's default
    assert call.logprobs and call.top_logprobs == 3
    assert (call.options.frequency_penalty, call.options.presence_penalty) == (0.5, -0.25)
    plain = http.parse_request(b'{"messages": [{"role": "user", "content": "x"}]}')
    assert not http.generate_request(plain).options.HasField("temperature")
    assert not http.generate_request(plain).logprobs
    for raw, param in ((b'"top_logprobs": 2', "top_logprobs"),  # without logprobs
                       (b'"logprobs": true, "top_logprobs": 21', "top_logprobs")):  # fmt: skip
        with pytest.raises(http.BadRequest) as caught:
            body_raw = b'{"messages": [{"role": "user", "content": "x"}], ' + raw + b"}"
            http.generate_request(http.parse_request(body_raw))
        assert caught.value.param == param, raw
    as_object = json.dumps({**body, "response_format": {"type": "json_object"}}).encode()
    assert json.loads(http.generate_request(http.parse_request(as_object)).json_schema) == {
        "type": "object"
    }
    assert http.http_status(grpc.StatusCode.INVALID_ARGUMENT)[0] == 400
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert http.rpc_param(invalid, "options.max_tokens: 500 is over") == "options.max_tokens"
    assert http.rpc_param(invalid, "inputs['a b']: missing") == "inputs['a b']"
    assert http.rpc_param(invalid, "messages[1].role: 'tool'") == "messages[1].role"
    assert http.rpc_param(invalid, "the prompt is too long") is None
    assert http.rpc_param(grpc.StatusCode.UNAVAILABLE, "options.x: y") is None
    assert http.http_status(grpc.StatusCode.UNAUTHENTICATED)[0] == 401
    assert http.http_status(grpc.StatusCode.RESOURCE_EXHAUSTED)[0] == 429


def test_a_responses_request_becomes_the_generate_call_it_asks_for() -> None:
    """OpenAI's Responses API: `instructions` first as the system message, `input` a text or
    message items of text parts; what a stateless runtime without tools cannot take is a 400
    naming it, with what to send instead."""
    body = responses.ResponsesBody.model_validate({
        "model": "any", "instructions": "Be brief.", "max_output_tokens": 9, "temperature": 0.2,
        "store": True, "reasoning": {"effort": "low"},  # ignored
        "input": [{"role": "developer", "content": "Answer in French."},
                  {"type": "message", "role": "user",
                   "content": [{"type": "input_text", "text": "a"},
                               {"type": "input_text", "text": "b"}]},
                  {"role": "assistant", "content": [{"type": "output_text", "text": "c"}]}],
        "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "integer"}}},
        "include": [responses.LOGPROBS_INCLUDE], "top_logprobs": 2,
    })  # fmt: skip
    call = responses.responses_call(body)
    assert [(m.role, m.content) for m in call.messages] == [
        ("system", "Be brief."), ("system", "Answer in French."), ("user", "ab"),
        ("assistant", "c")]  # fmt: skip
    assert call.options.max_tokens == 9 and call.options.temperature == pytest.approx(0.2)
    assert not call.options.HasField("top_p")  # unset: the server's default
    assert json.loads(call.json_schema) == {"type": "integer"}
    assert call.logprobs and call.top_logprobs == 2
    plain = responses.responses_call(responses.ResponsesBody(input="hi"))
    assert [(m.role, m.content) for m in plain.messages] == [("user", "hi")]
    assert not plain.json_schema and not plain.logprobs
    refused = {
        "input[0]": {"input": [{"type": "function_call_output", "output": "1"}]},
        "input[0].content[1]": {"input": [{"role": "user", "content": [
            {"type": "input_text", "text": "a"}, {"type": "input_image", "image_url": "x"}]}]},
        "input[0].role": {"input": [{"role": "tool", "content": "x"}]},
        "input": {"input": []},
        "previous_response_id": {"input": "x", "previous_response_id": "resp_1"},
        "tools": {"input": "x", "tools": [{"type": "function", "name": "f"}]},
        "top_logprobs": {"input": "x", "top_logprobs": 2},  # without the include
        "text.format.schema": {"input": "x", "text": {"format": {"type": "json_schema"}}},
    }  # fmt: skip
    for param, given in refused.items():
        with pytest.raises(http.BadRequest) as caught:
            responses.responses_call(responses.ResponsesBody.model_validate(given))
        assert caught.value.param == param, given


def test_a_responses_answer_and_stream_have_openais_shapes() -> None:
    body = responses.ResponsesBody(input="hi", max_output_tokens=2)
    usage = pb.Usage(prompt_tokens=5, completion_tokens=2, cached_prompt_tokens=3)
    chunks = [
        pb.GenerateChunk(text="Bon"),
        pb.GenerateChunk(text="jour", finish_reason=pb.FINISH_REASON_LENGTH, usage=usage),
    ]
    ids = responses.Ids("resp_1", "msg_1")
    whole = responses.response_object(chunks, body, "m", ids)
    assert whole["status"] == "incomplete"
    assert whole["incomplete_details"] == {"reason": "max_output_tokens"}
    assert whole["output"][0]["content"][0]["text"] == "Bonjour"
    assert whole["usage"]["input_tokens_details"] == {"cached_tokens": 3}
    assert whole["usage"]["total_tokens"] == 7
    events = list(responses.response_events(iter(chunks), body, "m", ids))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.incomplete",
    ]  # fmt: skip
    assert events[0]["response"]["status"] == "in_progress"
    assert events[-1]["response"] == whole
    stopped = [chunks[0], pb.GenerateChunk(finish_reason=pb.FINISH_REASON_STOP, usage=usage)]
    assert responses.response_object(stopped, body, "m", ids)["status"] == "completed"


def test_a_text_completion_request_becomes_a_generate_call_with_its_prompt() -> None:
    from services.core.http_api import completions

    body = {"model": "m", "prompt": ["Once upon a time"], "max_tokens": 7, "temperature": 0.5,
            "stop": "\n", "seed": 3, "top_k": 4}  # fmt: skip
    request = http.parse_body(completions.CompletionRequest, json.dumps(body).encode())
    call = completions.completion_call(request)
    assert call.prompt == "Once upon a time" and not call.messages
    assert call.options.max_tokens == 7 and call.options.top_k == 4 and list(call.stop) == ["\n"]
    assert not call.logprobs
    listed = completions.completion_call(
        http.parse_body(completions.CompletionRequest, b'{"prompt": "p", "logprobs": 0}')
    )
    assert listed.logprobs and listed.top_logprobs == 0  # each token's own, no alternatives
    refused = {b'{"prompt": "p", "echo": true}': "echo", b'{"prompt": "p", "logprobs": 21}':
               "logprobs", b'{"prompt": "p", "suffix": "x"}': "suffix",
               b'{"prompt": ["a", "b"]}': "prompt", b'{"prompt": ""}': "prompt",
               b'{"prompt": "p", "n": 17}': "n", b'{"model": "m"}': "prompt"}  # fmt: skip
    for raw, param in refused.items():
        with pytest.raises(http.BadRequest) as caught:
            completions.completion_call(http.parse_body(completions.CompletionRequest, raw))
        assert caught.value.param == param, raw
    chunks = [pb.GenerateChunk(text="a"), pb.GenerateChunk(text="b"), pb.GenerateChunk(
        finish_reason=pb.FINISH_REASON_LENGTH, usage=pb.Usage(prompt_tokens=4,
                                                              completion_tokens=2))]  # fmt: skip
    whole = completions.text_completion([chunks], "m", "cmpl-1")
    assert whole["object"] == "text_completion" and whole["choices"][0]["text"] == "ab"
    assert whole["choices"][0]["finish_reason"] == "length" and whole["usage"]["total_tokens"] == 6
    events = list(completions.text_stream_events(((0, c) for c in chunks), "m", "cmpl-1", True))
    assert [e["choices"][0]["text"] for e in events if e["choices"]] == ["a", "b", ""]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2


def test_n_choices_are_calls_of_their_own_answered_as_openai_answers_them() -> None:
    """Each of `n` choices is its own Generate call (with a seed, choice i samples with seed +
    i); the answer lists them by index and counts the prompt once; streamed, each choice's
    pieces carry its index and the usage comes after the last choice ends."""
    from services.core.http_api import completions
    from services.core.http_api.choices import choice_calls

    seeded = pb.GenerateRequest(prompt="p", options=pb.SamplingOptions(seed=7, temperature=1))
    calls = choice_calls(seeded, 3)
    assert [c.options.seed for c in calls] == [7, 8, 9] and all(c.prompt == "p" for c in calls)
    unseeded = choice_calls(pb.GenerateRequest(prompt="p"), 2)
    assert not any(c.options.HasField("seed") for c in unseeded)

    def answer(text: str, completed: int) -> list[pb.GenerateChunk]:
        last = pb.GenerateChunk(finish_reason=pb.FINISH_REASON_STOP, usage=pb.Usage(
            prompt_tokens=5, completion_tokens=completed))  # fmt: skip
        return [pb.GenerateChunk(text=text), last]

    choices = [answer("red", 1), answer("dark blue", 2)]
    whole = http.completion(choices, "m", "chatcmpl-1")
    assert [c["message"]["content"] for c in whole["choices"]] == ["red", "dark blue"]
    assert [c["index"] for c in whole["choices"]] == [0, 1]
    assert whole["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                              "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
    arrived = [(1, choices[1][0]), (0, choices[0][0]), (0, choices[0][1]), (1, choices[1][1])]
    events = list(http.stream_events(iter(arrived), "m", "chatcmpl-1", True, n=2))
    said = [(e["choices"][0]["index"], e["choices"][0]["delta"].get("content"))
            for e in events if e["choices"]]  # fmt: skip
    assert said[:2] == [(0, ""), (1, "")] and (1, "dark blue") in said and (0, "red") in said
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3
    texts = list(completions.text_stream_events(iter(arrived), "m", "cmpl-1", False, n=2))
    assert [e["choices"][0]["index"] for e in texts] == [1, 0, 0, 1]


class _Stream:
    """A Generate stream's shape (iterable, cancellable) over given chunks, then an error."""

    def __init__(self, chunks: list[pb.GenerateChunk], error: Exception | None = None) -> None:
        self.chunks, self.error, self.cancelled = chunks, error, False

    def __iter__(self) -> Iterator[pb.GenerateChunk]:
        yield from self.chunks
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.cancelled = True


def test_streams_interleave_by_choice_and_one_failing_stops_the_others() -> None:
    from services.core.http_api.choices import Interleaved

    one = _Stream([pb.GenerateChunk(text="a"), pb.GenerateChunk(text="b")])
    assert list(Interleaved([one])) == [(0, one.chunks[0]), (0, one.chunks[1])]
    two = [_Stream([pb.GenerateChunk(text=t) for t in "xy"]), _Stream([pb.GenerateChunk(text="z")])]
    merged = list(Interleaved(two))
    assert sorted((i, c.text) for i, c in merged) == [(0, "x"), (0, "y"), (1, "z")]
    assert [c.text for i, c in merged if i == 0] == ["x", "y"]  # each stream's order kept
    failing = _Stream([], grpc.RpcError())
    waiting = _Stream([pb.GenerateChunk(text="w")])
    with pytest.raises(grpc.RpcError):
        list(Interleaved([waiting, failing]))
    assert waiting.cancelled


def test_a_llama_cpp_completion_body_becomes_the_generate_call_it_asks_for() -> None:
    """llama.cpp's `/completion` fields: -1 for the server's default length and a random seed,
    its grammar, schema, biases and `n_probs`; 0 tokens is a 400 naming `n_predict`."""
    from services.core.http_api import llama_server

    def call(**body: object) -> pb.GenerateRequest:
        parsed = http.parse_body(llama_server.CompletionBody, json.dumps(body).encode())
        return llama_server.completion_call(parsed)

    made = call(prompt="Once", n_predict=-1, seed=-1, json_schema={"type": "object"},
                logit_bias=[[42, -100]], n_probs=3, stop=["\n"], cache_prompt=True)  # fmt: skip
    assert made.prompt == "Once" and not made.options.HasField("max_tokens")
    assert not made.options.HasField("seed") and json.loads(made.json_schema) == {"type": "object"}
    assert dict(made.logit_bias) == {42: -100.0} and made.logprobs and made.top_logprobs == 3
    sized = call(prompt="Once", n_predict=7, seed=5, grammar='root ::= "a"', temperature=0)
    assert sized.options.max_tokens == 7 and sized.options.seed == 5 and sized.grammar
    for body, param in (({"prompt": "Once", "n_predict": 0}, "n_predict"), ({}, "prompt"),
                        ({"prompt": "Once", "n_probs": 21}, "n_probs")):  # fmt: skip
        with pytest.raises(http.BadRequest) as caught:
            call(**body)
        assert caught.value.param == param, body


def test_an_ollama_request_becomes_the_generate_call_it_asks_for() -> None:
    body = {"model": "triage:latest", "messages": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "a"}], "tools": [], "think": False,
            "format": {"type": "integer"}, "keep_alive": "5m",
            "options": {"num_predict": 9, "temperature": 0.2, "seed": -1, "stop": ["END"],
                        "num_ctx": 4096, "top_k": 5, "frequency_penalty": 0.5}}  # fmt: skip
    request = http.parse_body(ollama_api.ChatRequest, json.dumps(body).encode())
    assert request.stream  # Ollama streams unless told not to
    call = ollama_api.chat_call(request)
    assert call is not None
    assert [(m.role, m.content) for m in call.messages] == [("system", "Be brief."), ("user", "a")]
    assert call.options.max_tokens == 9 and call.options.top_k == 5 and list(call.stop) == ["END"]
    assert not call.options.HasField("seed")  # -1: a random seed, as unset is
    assert call.options.frequency_penalty == 0.5 and not call.options.HasField("presence_penalty")
    assert json.loads(call.json_schema) == {"type": "integer"}
    raw = json.dumps({"model": "m", "prompt": "p", "system": "s", "format": "json",
                      "options": {"num_predict": -1}}).encode()  # fmt: skip
    generate = http.parse_body(ollama_api.GenerateRequest, raw)
    call = ollama_api.generate_call(generate)
    assert call is not None and [m.role for m in call.messages] == ["system", "user"]
    assert json.loads(call.json_schema) == {"type": "object"}
    assert not call.options.HasField("max_tokens")  # -1: the server's limit
    raw = json.dumps({"model": "m", "prompt": "Once upon", "system": "s", "raw": True}).encode()
    call = ollama_api.generate_call(http.parse_body(ollama_api.GenerateRequest, raw))
    assert call is not None and call.prompt == "Once upon" and not call.messages  # as it is
    assert ollama_api.generate_call(ollama_api.GenerateRequest(model="m")) is None  # a "load"
    assert ollama_api.chat_call(ollama_api.ChatRequest(model="m")) is None
    refused = {
        b'{"model": "m", "prompt": "p", "suffix": "x"}': "suffix",
        b'{"model": "m", "prompt": "p", "context": [1, 2]}': "context",
        b'{"model": "m", "prompt": "p", "images": ["aGk="]}': "images",
        b'{"model": "m", "prompt": "p", "think": true}': "think",
        b'{"model": "m", "prompt": "p", "top_logprobs": 2}': "top_logprobs",
        b'{"model": "m", "prompt": "p", "logprobs": true, "top_logprobs": 99}': "top_logprobs",
        b'{"model": "m", "prompt": "p", "options": {"num_predict": 0}}': "options.num_predict",
        b'{"model": "m", "prompt": "p", "options": {"temperature": 3}}': "options.temperature",
        b'{"prompt": "p"}': "model",
    }
    for raw, param in refused.items():
        with pytest.raises(http.BadRequest) as caught:
            ollama_api.generate_call(http.parse_body(ollama_api.GenerateRequest, raw))
        assert caught.value.param == param, raw
    for raw, param in ((b'{"model": "m", "messages": [{"role": "tool", "content": "x"}]}',
                        "messages.0.role"),
                       (b'{"model": "m", "messages": [{"role": "user", "images": ["aGk="]}]}',
                        "messages.0.images"),
                       (b'{"model": "m", "messages": [], "tools": [{}]}', "tools")):  # fmt: skip
        with pytest.raises(http.BadRequest) as caught:
            ollama_api.chat_call(http.parse_body(ollama_api.ChatRequest, raw))
        assert caught.value.param == param, raw


def test_ollama_names_and_answers_have_ollamas_shapes() -> None:
    assert ollama_api.served_names("SmolLM2 135M") == ("smollm2-135m:latest", "smollm2-135m",
                                                       "SmolLM2 135M")  # fmt: skip
    ollama_api.check_model("triage", "triage")
    with pytest.raises(ollama_api.ModelNotFound, match="serves 'triage:latest'"):
        ollama_api.check_model("llama3", "triage")
    assert ollama_api.in_ollama_terms("options.max_tokens: 500 is over") == (
        "options.num_predict: 500 is over"
    )
    assert ollama_api.in_ollama_terms("stop[1]: too long") == "options.stop[1]: too long"
    assert ollama_api.in_ollama_terms("inputs: x") == "inputs: x"
    last = pb.GenerateChunk(text="c", finish_reason=pb.FINISH_REASON_LENGTH, latency_ms=30,
                            time_to_first_token_ms=10,
                            usage=pb.Usage(prompt_tokens=7, completion_tokens=3))  # fmt: skip
    chunks = [pb.GenerateChunk(text="a"), pb.GenerateChunk(text="b"), last]
    lines = list(ollama_api.answer_lines(iter(chunks), "m", chat=True))
    assert [line["message"]["content"] for line in lines] == ["a", "b", "c", ""]
    assert [line["done"] for line in lines] == [False, False, False, True]
    assert lines[-1] | {"created_at": ANY} == {
        "model": "m", "created_at": ANY, "message": {"role": "assistant", "content": ""},
        "done": True, "done_reason": "length", "total_duration": 30_000_000, "load_duration": 0,
        "prompt_eval_count": 7, "prompt_eval_duration": 10_000_000, "eval_count": 3,
        "eval_duration": 20_000_000,
    }  # fmt: skip
    whole = ollama_api.whole_answer(chunks, "m", chat=False)
    assert whole["response"] == "abc" and whole["done"] and whole["eval_count"] == 3


@pytest.fixture(scope="module")
def served(
    gguf_path: Path, program_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, int, ServerProcess, int]]:
    """A runtime and a router in front of it, both with the HTTP API and a bearer token."""
    runtime_http, router_http = free_port(), free_port()
    env = {"EDGEDISTILL_AUTH_TOKEN": TOKEN}
    runtime = start_runtime(
        "--model", str(gguf_path), "--program", str(program_path), "--n-ctx", "1024",
        "--max-tokens-limit", "64", "--max-tokens-default", "32", "--http-port", str(runtime_http),
        "--http-allowed-origins", "http://dash.local:3000", env=env,
    )  # fmt: skip
    bundle = make_bundle(
        tmp_path_factory.mktemp("bundle"), gguf_path, CAPITALS_PROGRAM, threshold=0.5
    )
    router_env = {"EDGEDISTILL_ROUTER_AUTH_TOKEN": TOKEN, "EDGEDISTILL_ROUTER_LOCAL_TOKEN": TOKEN}
    try:
        router = start_router(
            bundle, runtime.target, "--http-port", str(router_http), env=router_env
        )
        yield runtime, runtime_http, router, router_http
        router.terminate()
    finally:
        runtime.terminate()


def grpc_text(target: str, request: pb.GenerateRequest) -> str:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        chunks = stub.Generate(request, metadata=token_metadata(TOKEN), timeout=60)
        return "".join(chunk.text for chunk in chunks)


def test_the_openai_client_gets_what_generate_answers_streamed_or_not(
    served: tuple[ServerProcess, int, ServerProcess, int],
) -> None:
    import openai

    runtime, runtime_http, _, router_http = served
    expected = grpc_text(runtime.target, pb.GenerateRequest(
        messages=[pb.ChatMessage(**m) for m in QUESTION],
        options=pb.SamplingOptions(max_tokens=12, temperature=0.0),
    ))  # fmt: skip
    assert expected.strip()
    for port in (runtime_http, router_http):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN)
        (model,) = client.models.list().data
        reply = client.chat.completions.create(
            model=model.id,
            messages=QUESTION,
            max_tokens=12,
            temperature=0,  # type: ignore[arg-type]
        )
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 12
        stream = client.chat.completions.create(
            model=model.id, messages=QUESTION, max_tokens=12, temperature=0,  # type: ignore[arg-type]
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_the_responses_api_answers_the_openai_client_and_dspy_as_generate_does(
    served: tuple[ServerProcess, int, ServerProcess, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`/v1/responses` (stateless, as Ollama's and llama.cpp's server's): the `openai`
    client's `responses.create`, whole and streamed, and `dspy.LM(model_type="responses")`
    get what Generate answers, through the runtime and the router."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # offline: no price list fetch
    import dspy
    import openai

    runtime, runtime_http, _, router_http = served
    system = "Answer in one line."
    expected = grpc_text(runtime.target, pb.GenerateRequest(
        messages=[pb.ChatMessage(role="system", content=system),
                  *(pb.ChatMessage(**m) for m in QUESTION)],
        options=pb.SamplingOptions(max_tokens=12, temperature=0.0),
    ))  # fmt: skip
    assert expected.strip()
    plain = grpc_text(runtime.target, pb.GenerateRequest(
        messages=[pb.ChatMessage(**m) for m in QUESTION],
        options=pb.SamplingOptions(max_tokens=12, temperature=0.0),
    ))  # fmt: skip
    for port in (runtime_http, router_http):
        base = f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=base, api_key=TOKEN)
        (model,) = client.models.list().data
        assert client.models.retrieve(model.id).id == model.id
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("gpt-4o")
        reply = client.responses.create(model=model.id, instructions=system,
                                        input=QUESTION[0]["content"], max_output_tokens=12,
                                        temperature=0)  # fmt: skip
        assert reply.output_text == expected and reply.status in ("completed", "incomplete")
        assert reply.usage is not None and 0 < reply.usage.output_tokens <= 12
        stream = client.responses.create(model=model.id, instructions=system, input=QUESTION,
                                         max_output_tokens=12, temperature=0, stream=True)  # type: ignore[arg-type]  # fmt: skip
        events = list(stream)
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert deltas == expected and events[-1].type == f"response.{reply.status}"
        assert events[-1].response.output_text == expected
        with pytest.raises(openai.BadRequestError, match="tool calls are not served"):
            client.responses.create(model=model.id, input="x",
                                    tools=[{"type": "function", "name": "f", "parameters": {}}])  # type: ignore[list-item]  # fmt: skip
        lm = dspy.LM("openai/edge", model_type="responses", api_base=base, api_key=TOKEN,
                     temperature=0.0, max_tokens=12, cache=False)  # fmt: skip
        (said,) = lm(QUESTION[0]["content"])
        assert (said["text"] if isinstance(said, dict) else said) == plain


def test_json_schema_output_parses_and_dspy_lm_talks_to_it(
    served: tuple[ServerProcess, int, ServerProcess, int],
) -> None:
    import dspy
    import openai

    _, runtime_http, _, _ = served
    base = f"http://127.0.0.1:{runtime_http}/v1"
    client = openai.OpenAI(base_url=base, api_key=TOKEN)
    colours = ["red", "green", "blue"]
    schema = {"type": "object", "properties": {"colour": {"enum": colours}},
              "required": ["colour"], "additionalProperties": False}  # fmt: skip
    reply = client.chat.completions.create(
        model="edge", messages=QUESTION, max_tokens=40, temperature=1.0, seed=3,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    )  # fmt: skip
    assert json.loads(reply.choices[0].message.content or "")["colour"] in colours
    lm = dspy.LM("openai/edge", api_base=base, api_key=TOKEN, temperature=0.0, max_tokens=12,
                 cache=False)  # fmt: skip
    expected = client.chat.completions.create(
        model="edge",
        messages=QUESTION,
        max_tokens=12,
        temperature=0,  # type: ignore[arg-type]
    )
    assert lm(QUESTION[0]["content"]) == [expected.choices[0].message.content]


def test_the_token_and_the_servers_limits_hold_over_http(
    served: tuple[ServerProcess, int, ServerProcess, int],
) -> None:
    import openai

    _, runtime_http, _, router_http = served
    for port in (runtime_http, router_http):
        base = f"http://127.0.0.1:{port}/v1"
        with pytest.raises(openai.AuthenticationError, match="bearer token"):
            openai.OpenAI(base_url=base, api_key="wrong").chat.completions.create(
                model="edge",
                messages=QUESTION,  # type: ignore[arg-type]
            )
        client = openai.OpenAI(base_url=base, api_key=TOKEN, max_retries=0)
        with pytest.raises(openai.BadRequestError, match="max_tokens"):  # the runtime's limit
            client.chat.completions.create(
                model="edge",
                messages=QUESTION,
                max_tokens=500,  # type: ignore[arg-type]
            )
        with pytest.raises(openai.BadRequestError, match=r"messages\.0\.role"):
            client.chat.completions.create(
                model="edge",
                messages=[{"role": "tool", "content": "x"}],  # type: ignore[arg-type,list-item,misc]
            )


def test_predict_and_health_over_http_answer_as_grpc_does(
    served: tuple[ServerProcess, int, ServerProcess, int],
) -> None:
    import httpx

    runtime, runtime_http, _, router_http = served
    with grpc.insecure_channel(runtime.target) as channel:
        expected = pb_grpc.InferenceStub(channel).Predict(
            pb.PredictRequest(inputs={"country": "Italy"}), metadata=token_metadata(TOKEN)
        )
    country = {"inputs": {"country": "Italy"}}
    for port in (runtime_http, router_http):
        # One kept-alive connection throughout: an answer of each kind leaves it usable.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            assert client.get("/health").json() == {"status": "ok"}
            assert client.post("/v1/nothing", json=country).status_code == 404
            assert client.post("/v1/predict", json=country).status_code == 401
            client.headers["Authorization"] = f"Bearer {TOKEN}"
            reply = client.post("/v1/predict", json=country)
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert body["outputs_json"] == json.loads(expected.outputs_json)
            assert body["outcome"] == "PREDICT_OUTCOME_PARSED"
            assert body["served_by"] == "SERVED_BY_LOCAL"
            assert 0 < body["confidence"] <= 1 and body["usage"]["prompt_tokens"] > 0
            wrong = client.post("/v1/predict", json={"inputs": {"nation": "Italy"}})
            assert wrong.status_code == 400 and "nation" in wrong.json()["error"]["message"]
            assert wrong.json()["error"]["param"] == "inputs['nation']"
            # JSON's null is no country (not the text "null"); a JSON value of the type is one
            null = client.post("/v1/predict", json={"inputs": {"country": None}})
            assert null.status_code == 400 and null.json()["error"]["param"] == "inputs['country']"
            assert "null is not a str" in null.json()["error"]["message"]
            chunked = client.post("/v1/predict", content=iter([json.dumps(country).encode()]))
            assert chunked.status_code == 400 and chunked.json()["error"]["param"] == "body"
            assert chunked.headers["connection"] == "close"  # its body unread: no next call
            assert client.post("/v1/predict", json=country).json() == {
                **body,
                "latency_ms": ANY,
                "queue_ms": ANY,
                "usage": ANY,
                "lm_calls": ANY,
            }
            # "stream": true: PredictStream's chunks as server-sent events
            streamed = client.post("/v1/predict", json={**country, "stream": True})
        assert streamed.headers["content-type"] == "text/event-stream", streamed.text
        events = [json.loads(line.removeprefix("data: ")) for line in streamed.text.splitlines()
                  if line.startswith("data: {")]  # fmt: skip
        assert "".join(e["delta"]["text"] for e in events[:-1]) == expected.outputs["capital"]
        assert {e["delta"]["field"] for e in events[:-1]} == {"capital"}
        assert events[-1]["response"]["outputs_json"] == json.loads(expected.outputs_json)


def test_the_ollama_client_litellm_and_dspy_get_what_generate_answers(
    served: tuple[ServerProcess, int, ServerProcess, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # offline: no price list fetch
    import dspy
    import httpx
    import litellm
    import ollama

    runtime, runtime_http, _, router_http = served
    expected = grpc_text(runtime.target, pb.GenerateRequest(
        messages=[pb.ChatMessage(**m) for m in QUESTION],
        options=pb.SamplingOptions(max_tokens=12, temperature=0.0),
    ))  # fmt: skip
    greedy = {"temperature": 0, "num_predict": 12}
    for port in (runtime_http, router_http):
        host = f"http://127.0.0.1:{port}"
        client = ollama.Client(host=host, headers={"Authorization": f"Bearer {TOKEN}"})
        (listed,) = client.list().models
        name = str(listed.model)
        assert name.endswith(":latest") and listed.details is not None
        shown = client.show(name).details
        assert shown is not None and shown.quantization_level == listed.details.quantization_level
        assert client.ps().models[0].context_length == 1024
        reply = client.chat(name, messages=QUESTION, options=greedy)
        assert reply.message.content == expected and reply.done
        assert reply.eval_count is not None and 0 < reply.eval_count <= 12
        lines = list(client.chat(name, messages=QUESTION, options=greedy, stream=True))
        assert "".join(line.message.content or "" for line in lines) == expected
        assert [line.done for line in lines].count(True) == 1 and lines[-1].done_reason
        made = client.generate(name, QUESTION[0]["content"], options=greedy)
        assert made.response == expected
        assert client.generate(name, "").done_reason == "load"
        with pytest.raises(ollama.ResponseError) as caught:
            client.chat("llama3.2", messages=QUESTION)
        assert caught.value.status_code == 404 and name in caught.value.error
        with pytest.raises(ollama.ResponseError) as caught:
            client.chat(name, messages=QUESTION, options={"num_predict": 500})  # over the limit
        assert caught.value.status_code == 400
        assert caught.value.error.startswith("options.num_predict")
        with pytest.raises(ollama.ResponseError) as caught:
            ollama.Client(host=host).chat(name, messages=QUESTION)
        assert caught.value.status_code == 401
        with pytest.raises(ollama.ResponseError) as caught:
            client.pull(name)
        assert caught.value.status_code == 404 and "not served" in caught.value.error
        assert httpx.head(host).status_code == 200  # how Ollama's CLI finds a server
        assert "running" in httpx.get(host).text
    colours = ["red", "green", "blue"]
    schema = {"type": "object", "properties": {"colour": {"enum": colours}},
              "required": ["colour"]}  # fmt: skip
    typed = client.chat(name, messages=QUESTION, format=schema, options={"temperature": 1.0})
    assert json.loads(typed.message.content or "")["colour"] in colours
    root = f"http://127.0.0.1:{runtime_http}"
    for stream in (False, True):  # LiteLLM's ollama_chat/ calls /api/chat
        reply = litellm.completion(
            model=f"ollama_chat/{name}", api_base=root, api_key=TOKEN, messages=QUESTION,
            temperature=0, max_tokens=12, stream=stream,
        )  # fmt: skip
        said = ("".join(c.choices[0].delta.content or "" for c in reply) if stream
                else reply.choices[0].message.content)  # fmt: skip
        assert said == expected, stream
    # DSPy's own engine calls `<root>/chat/completions` for ollama_chat/, also served.
    lm = dspy.LM(f"ollama_chat/{name}", api_base=root, api_key=TOKEN, temperature=0.0,
                 max_tokens=12, cache=False)  # fmt: skip
    assert lm(QUESTION[0]["content"]) == [expected]


def test_a_text_completion_continues_the_prompt_as_llama_cpp_does(
    served: tuple[ServerProcess, int, ServerProcess, int], gguf_path: Path
) -> None:
    """A prompt (no chat template) is continued as llama-cpp-python's own completion continues
    it, over gRPC, OpenAI's `/v1/completions` (streamed or not) and Ollama's raw generate."""
    import llama_cpp
    import ollama
    import openai

    prompt = "The three primary colours are"
    reference = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, verbose=False)
    expected = reference.create_completion(prompt, max_tokens=12, temperature=0.0,
                                           repeat_penalty=1.0)["choices"][0]["text"]  # fmt: skip
    penalties = {"frequency_penalty": 1.2, "presence_penalty": 0.6}
    penalised = reference.create_completion(prompt, max_tokens=12, temperature=0.0,
                                            repeat_penalty=1.0, **penalties)  # fmt: skip
    reference.close()
    assert expected.strip() and penalised["choices"][0]["text"] != expected
    runtime, runtime_http, router, router_http = served
    greedy = pb.SamplingOptions(max_tokens=12, temperature=0.0)
    call = pb.GenerateRequest(prompt=prompt, options=greedy)
    assert grpc_text(runtime.target, call) == expected
    assert grpc_text(router.target, call) == expected
    for port in (runtime_http, router_http):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN)
        reply = client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0)
        assert reply.choices[0].text == expected and reply.object == "text_completion"
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 12
        pieces = list(client.completions.create(model="m", prompt=prompt, max_tokens=12,
                                                temperature=0, stream=True))  # fmt: skip
        assert "".join(p.choices[0].text for p in pieces) == expected
        same = client.completions.create(model="m", prompt=prompt, max_tokens=12,
                                         temperature=0, **penalties)  # fmt: skip
        assert same.choices[0].text == penalised["choices"][0]["text"]  # llama.cpp's penalties
        host = ollama.Client(host=f"http://127.0.0.1:{port}",
                             headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        name = str(host.list().models[0].model)
        made = host.generate(name, prompt, raw=True, options={"temperature": 0, "num_predict": 12})
        assert made.response == expected
    with grpc.insecure_channel(runtime.target) as channel, pytest.raises(grpc.RpcError) as caught:
        both = pb.GenerateRequest(prompt=prompt, messages=[pb.ChatMessage(**QUESTION[0])])
        list(pb_grpc.InferenceStub(channel).Generate(both, metadata=token_metadata(TOKEN)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("prompt:")


def test_a_grammar_gives_llama_cpps_own_completion_under_it_over_grpc_and_openais_api(
    served: tuple[ServerProcess, int, ServerProcess, int], gguf_path: Path
) -> None:
    """A GBNF grammar (llama.cpp's server's `grammar`) gives llama-cpp-python's own greedy
    completion under that grammar, over gRPC and OpenAI's text completions, through the
    runtime and the router; a chat keeps to it; one llama.cpp cannot parse is a 400 naming
    `grammar` with the parser's reason."""
    import llama_cpp
    import openai

    prompt = "The three primary colours are"
    grammar = 'root ::= ":" (" " colour ","){2} " and " colour "."\ncolour ::= [a-z]{1,8}'
    reference = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, verbose=False)
    expected = reference.create_completion(
        prompt, max_tokens=24, temperature=0.0, repeat_penalty=1.0,
        grammar=llama_cpp.LlamaGrammar.from_string(grammar, verbose=False),
    )["choices"][0]["text"]  # fmt: skip
    free = reference.create_completion(prompt, max_tokens=24, temperature=0.0,
                                       repeat_penalty=1.0)["choices"][0]["text"]  # fmt: skip
    reference.close()
    assert re.fullmatch(r":( [a-z]+,){2} and [a-z]+\.", expected) and free != expected, expected
    runtime, runtime_http, router, router_http = served
    greedy = pb.SamplingOptions(max_tokens=24, temperature=0.0)
    call = pb.GenerateRequest(prompt=prompt, grammar=grammar, options=greedy)
    assert grpc_text(runtime.target, call) == expected
    assert grpc_text(router.target, call) == expected
    yes_no = 'root ::= "yes" | "no"'
    for port in (runtime_http, router_http):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN)
        reply = client.completions.create(model="m", prompt=prompt, max_tokens=24, temperature=0,
                                          extra_body={"grammar": grammar})  # fmt: skip
        assert reply.choices[0].text == expected
        chat = client.chat.completions.create(
            model="m", messages=QUESTION, max_tokens=8, temperature=1.5,  # type: ignore[arg-type]
            extra_body={"grammar": yes_no},
        )  # fmt: skip
        assert chat.choices[0].message.content in ("yes", "no")
        with pytest.raises(openai.BadRequestError, match="Undefined rule identifier") as caught:
            client.completions.create(model="m", prompt=prompt,
                                      extra_body={"grammar": "root ::= x"})  # fmt: skip
        assert caught.value.body["param"] == "grammar"  # type: ignore[index]


def test_a_logit_bias_gives_llama_cpps_own_completion_with_it_over_grpc_and_openais_api(
    served: tuple[ServerProcess, int, ServerProcess, int], gguf_path: Path
) -> None:
    """Token ids banned (-100) and favoured (+5) give llama-cpp-python's own greedy completion
    with that `logit_bias`, over gRPC, OpenAI's text completions (its `{"id": bias}`) and
    llama.cpp's `[[id, bias]]`, through the runtime and the router."""
    import llama_cpp
    import openai

    prompt = "The three primary colours are"
    reference = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, verbose=False)
    free = reference.create_completion(prompt, max_tokens=12, temperature=0.0, repeat_penalty=1.0)
    first = reference.tokenize(free["choices"][0]["text"].encode(), add_bos=False)[0]
    favoured = reference.tokenize(b" purple", add_bos=False)[0]
    bias = {first: -100.0, favoured: 5.0}
    expected = reference.create_completion(prompt, max_tokens=12, temperature=0.0,
                                           repeat_penalty=1.0, logit_bias=bias)  # fmt: skip
    reference.close()
    text = expected["choices"][0]["text"]
    assert text != free["choices"][0]["text"], text
    runtime, runtime_http, router, router_http = served
    greedy = pb.SamplingOptions(max_tokens=12, temperature=0.0)
    call = pb.GenerateRequest(prompt=prompt, logit_bias=bias, options=greedy)
    assert grpc_text(runtime.target, call) == text
    assert grpc_text(router.target, call) == text
    for port in (runtime_http, router_http):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN)
        as_openai = {str(token): value for token, value in bias.items()}
        as_llama_cpp = [[token, value] for token, value in bias.items()]
        for given in ({"logit_bias": as_openai}, {"extra_body": {"logit_bias": as_llama_cpp}}):
            reply = client.completions.create(
                model="m",
                prompt=prompt,
                max_tokens=12,
                temperature=0,
                **given,  # type: ignore[arg-type]
            )
            assert reply.choices[0].text == text, given
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="m", prompt=prompt, logit_bias={"99999999": -100})
        assert caught.value.body["param"] == "logit_bias[99999999]"  # type: ignore[index]


def test_n_choices_are_the_calls_with_seed_plus_i_whole_streamed_and_to_dspy(
    served: tuple[ServerProcess, int, ServerProcess, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`n` choices over OpenAI's API: choice i is the answer to the same call with seed + i,
    whole or streamed, on the runtime and through the router; the prompt is counted once;
    `dspy.LM(..., n=3)` gets three answers."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # offline: no price list fetch
    import dspy
    import openai

    _, runtime_http, _, router_http = served
    asked = {"model": "m", "messages": QUESTION, "max_tokens": 10, "temperature": 1.5}
    for port in (runtime_http, router_http):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN)
        alone = [client.chat.completions.create(**asked, seed=11 + i) for i in range(3)]
        texts = [reply.choices[0].message.content for reply in alone]
        assert len(set(texts)) > 1, texts  # seeds that sample differently
        reply = client.chat.completions.create(**asked, seed=11, n=3)
        assert [c.index for c in reply.choices] == [0, 1, 2]
        assert [c.message.content for c in reply.choices] == texts
        assert reply.usage is not None and alone[0].usage is not None
        assert reply.usage.prompt_tokens == alone[0].usage.prompt_tokens
        assert reply.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)  # type: ignore[union-attr]
        streamed = ["", "", ""]
        for event in client.chat.completions.create(**asked, seed=11, n=3, stream=True):
            for choice in event.choices:
                streamed[choice.index] += choice.delta.content or ""
        assert streamed == texts
        text = client.completions.create(model="m", prompt="Once upon a time", max_tokens=8,
                                         temperature=1.5, seed=5, n=2)  # fmt: skip
        one = client.completions.create(model="m", prompt="Once upon a time", max_tokens=8,
                                        temperature=1.5, seed=6)  # fmt: skip
        assert len(text.choices) == 2 and text.choices[1].text == one.choices[0].text
    lm = dspy.LM("openai/edge", api_base=f"http://127.0.0.1:{runtime_http}/v1", api_key=TOKEN,
                 temperature=1.5, max_tokens=10, cache=False)  # fmt: skip
    assert len(lm("Name three colours.", n=3)) == 3


def test_log_probabilities_are_llama_cpps_over_openais_and_ollamas_apis(
    served: tuple[ServerProcess, int, ServerProcess, int], gguf_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A text completion's token log-probabilities are llama-cpp-python's own (its
    `create_completion` with `logprobs`), through the runtime and the router; a chat's come
    in OpenAI's shape, whole or streamed (and to `dspy.LM(..., logprobs=True)`), and in
    Ollama's."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # offline: no price list fetch
    import dspy
    import llama_cpp
    import ollama
    import openai

    prompt = "The three primary colours are"
    reference = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, logits_all=True,
                                verbose=False)  # fmt: skip
    expected = reference.create_completion(prompt, max_tokens=8, temperature=0.0,
                                           repeat_penalty=1.0, logprobs=3)  # fmt: skip
    reference.close()
    theirs = expected["choices"][0]["logprobs"]
    _, runtime_http, _, router_http = served
    for port in (runtime_http, router_http):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN)
        ours = client.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0,
                                         logprobs=3).choices[0].logprobs  # fmt: skip
        assert ours is not None and ours.tokens == theirs["tokens"]
        # one model, other batch shapes: the same values but for float rounding
        assert ours.token_logprobs == pytest.approx(theirs["token_logprobs"], abs=0.05)
        for mine, its in zip(ours.top_logprobs or [], theirs["top_logprobs"], strict=True):
            assert max(mine, key=mine.__getitem__) == max(its, key=its.__getitem__)
            assert [mine[t] for t in its if t in mine] == pytest.approx(
                [its[t] for t in its if t in mine], abs=0.05)  # fmt: skip
        reply = client.chat.completions.create(
            model="m", messages=QUESTION, max_tokens=12, temperature=0,  # type: ignore[arg-type]
            logprobs=True, top_logprobs=2,
        )  # fmt: skip
        choice = reply.choices[0]
        assert choice.logprobs is not None and choice.logprobs.content
        content = choice.logprobs.content
        assert "".join(t.token for t in content) == choice.message.content
        assert all(t.top_logprobs[0].token == t.token and len(t.top_logprobs) == 2
                   for t in content)  # fmt: skip
        stream = client.chat.completions.create(
            model="m", messages=QUESTION, max_tokens=12, temperature=0,  # type: ignore[arg-type]
            logprobs=True, top_logprobs=2, stream=True,
        )  # fmt: skip
        streamed = [t for c in stream if c.choices and c.choices[0].logprobs
                    for t in c.choices[0].logprobs.content or []]  # fmt: skip
        assert [t.token for t in streamed] == [t.token for t in content]
        host = ollama.Client(host=f"http://127.0.0.1:{port}",
                             headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        name = str(host.list().models[0].model)
        said = host.chat(name, messages=QUESTION, options={"temperature": 0, "num_predict": 12},
                         logprobs=True, top_logprobs=2)  # fmt: skip
        assert said.logprobs and "".join(lp.token for lp in said.logprobs) == said.message.content
        assert [lp.logprob for lp in said.logprobs] == pytest.approx(
            [t.logprob for t in content], abs=0.05)  # fmt: skip
    lm = dspy.LM("openai/edge", api_base=f"http://127.0.0.1:{runtime_http}/v1", api_key=TOKEN,
                 logprobs=True, temperature=0.0, max_tokens=12, cache=False)  # fmt: skip
    (answer,) = lm(messages=QUESTION)
    assert "".join(t["token"] for t in answer["logprobs"]["content"]) == answer["text"]


def test_tokenize_and_detokenize_answer_as_llama_cpps_server_through_the_router(
    served: tuple[ServerProcess, int, ServerProcess, int],
) -> None:
    """`/tokenize` (a text's tokens alone unless `add_special`, with pieces on request, or a
    chat's as a chat completion prompts it) and `/detokenize`, on the runtime and through the
    router, agree with gRPC; a bad body is a 400 naming the field."""
    import httpx

    runtime, runtime_http, _, router_http = served
    with InferenceClient(runtime.target, token=TOKEN) as client:
        bare = list(client.tokenize(prompt="Hello world", bare=True).tokens)
        chat = list(client.tokenize([(m["role"], m["content"]) for m in QUESTION]).tokens)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for port in (runtime_http, router_http):
        base = f"http://127.0.0.1:{port}"
        said = httpx.post(f"{base}/tokenize", json={"content": "Hello world"}, headers=headers)
        assert said.json() == {"tokens": bare, "n_ctx": 1024}
        pieces = httpx.post(
            f"{base}/tokenize",
            headers=headers,
            json={"content": "Hello world", "with_pieces": True},
        ).json()
        assert [p["id"] for p in pieces["tokens"]] == bare
        assert "".join(p["piece"] for p in pieces["tokens"]) == "Hello world"
        as_chat = httpx.post(f"{base}/tokenize", json={"messages": QUESTION}, headers=headers)
        assert as_chat.json()["tokens"] == chat
        back = httpx.post(f"{base}/detokenize", json={"tokens": bare}, headers=headers)
        assert back.json() == {"content": "Hello world"}
        wrong = httpx.post(f"{base}/detokenize", json={"tokens": [bare[0], 10**7]},
                           headers=headers)  # fmt: skip
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "tokens[1]"
        neither = httpx.post(f"{base}/tokenize", json={}, headers=headers)
        assert neither.status_code == 400 and neither.json()["error"]["param"] == "content"


def test_llama_cpps_own_completion_and_template_endpoints_answer_as_its_server(
    served: tuple[ServerProcess, int, ServerProcess, int], gguf_path: Path
) -> None:
    """`POST /completion` answers as llama.cpp's server does: llama-cpp-python's own greedy
    text, why it stopped (`stop_type`, `stopping_word`), the counts and timings, each token's
    probability with its id, streamed as its events (no `[DONE]`); `/apply-template` gives the
    prompt a chat is given; on the runtime and through the router."""
    import httpx
    import llama_cpp

    prompt = "The three primary colours are"
    reference = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, verbose=False)
    expected = reference.create_completion(prompt, max_tokens=12, temperature=0.0,
                                           repeat_penalty=1.0)["choices"][0]  # fmt: skip
    n_prompt = len(reference.tokenize(prompt.encode()))
    words = expected["text"].split()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with InferenceClient(served[0].target, token=TOKEN) as client:
        chat = client.tokenize([(m["role"], m["content"]) for m in QUESTION], with_pieces=True)
    for port in (served[1], served[3]):
        url = f"http://127.0.0.1:{port}"
        asked = {"prompt": prompt, "n_predict": 12, "temperature": 0, "n_probs": 2}
        said = httpx.post(f"{url}/completion", json=asked, headers=headers, timeout=60).json()
        assert said["content"] == expected["text"] and said["stop"] is True
        assert said["stop_type"] == {"length": "limit", "stop": "eos"}[expected["finish_reason"]]
        assert said["tokens_predicted"] == len(said["completion_probabilities"]) <= 12
        assert said["tokens_evaluated"] == n_prompt and said["timings"]["predicted_n"] > 0
        ids = [entry["id"] for entry in said["completion_probabilities"]]
        assert reference.detokenize(ids).decode() == expected["text"]  # the vocabulary kept
        assert all(e["top_logprobs"][0]["id"] == e["id"] for e in said["completion_probabilities"])
        stops = [words[2], words[1]]  # the earliest of them ends it, whatever their order
        cut = httpx.post(f"{url}/completion", json={**asked, "stop": stops}, headers=headers,
                         timeout=60).json()  # fmt: skip
        assert cut["stop_type"] == "word" and cut["stopping_word"] == words[1]
        assert cut["content"] == expected["text"][: expected["text"].index(words[1])]
        with httpx.stream("POST", f"{url}/completion", json={**asked, "stream": True},
                          headers=headers, timeout=60) as reply:  # fmt: skip
            lines = [line for line in reply.iter_lines() if line]
        events = [json.loads(line.removeprefix("data: ")) for line in lines]
        assert "".join(e["content"] for e in events) == expected["text"] and events[-1]["stop"]
        template = httpx.post(f"{url}/apply-template", json={"messages": QUESTION},
                              headers=headers).json()  # fmt: skip
        assert template["prompt"] == "".join(piece.token for piece in chat.pieces)
        assert template["prompt"].endswith("Name three colours.<|im_end|>\n<|im_start|>assistant\n")
    reference.close()


def test_props_describe_the_served_model_as_llama_cpps_server_does(
    served: tuple[ServerProcess, int, ServerProcess, int], gguf_path: Path
) -> None:
    """`GET /props`: the context, slots and call defaults the runtime serves with (a call
    setting nothing gets them), and the GGUF's chat template with its tokens, which a client
    rendering a chat with jinja2 turns into `/apply-template`'s prompt; runtime and router."""
    import httpx
    import jinja2

    from services.core.gguf_metadata import read_gguf_metadata
    from services.core.sampling import GENERATE_DEFAULT_TEMPERATURE
    from services.core.validation import Limits, sampling_params

    template = read_gguf_metadata(gguf_path)["tokenizer.chat_template"]
    defaults = sampling_params(pb.SamplingOptions(), Limits(32, 64, 1 << 20, 1024),
                               default_temperature=GENERATE_DEFAULT_TEMPERATURE)  # fmt: skip
    with InferenceClient(served[0].target, token=TOKEN) as client:
        served_name = client.info().model_name
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for port in (served[1], served[3]):
        url = f"http://127.0.0.1:{port}"
        props = httpx.get(f"{url}/props", headers=headers, timeout=60).json()
        settings = props["default_generation_settings"]
        assert settings["n_ctx"] == 1024 and props["total_slots"] == 1  # --n-ctx, --parallel
        assert settings["params"]["n_predict"] == 32  # --max-tokens-default
        assert {
            name: getattr(defaults, name) for name in settings["params"] if name != "n_predict"
        } == {name: value for name, value in settings["params"].items() if name != "n_predict"}
        assert props["chat_template"] == template and props["eos_token"] == "<|im_end|>"
        rendered = jinja2.Environment().from_string(props["chat_template"]).render(
            messages=QUESTION, add_generation_prompt=True,
            bos_token=props["bos_token"], eos_token=props["eos_token"],
        )  # fmt: skip
        applied = httpx.post(f"{url}/apply-template", json={"messages": QUESTION},
                             headers=headers, timeout=60).json()  # fmt: skip
        assert rendered == applied["prompt"]
        assert props["model_alias"] == served_name
        refused = httpx.get(f"{url}/props", timeout=60)
        assert refused.status_code == 401  # the token applies to it as to every route


def test_slots_say_which_slot_decodes_as_llama_cpps_server_does(
    served: tuple[ServerProcess, int, ServerProcess, int],
) -> None:
    """`GET /slots`: idle before a call, decoding during one (its prompt counted, tokens
    generated so far), and `?fail_on_no_slot=1` is 503 while none is free; runtime and router."""
    import httpx

    headers = {"Authorization": f"Bearer {TOKEN}"}
    story = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content="Write a long story about a lighthouse.")],
        options=pb.SamplingOptions(max_tokens=64, temperature=0.0),
    )
    for port in (served[1], served[3]):
        url = f"http://127.0.0.1:{port}/slots"
        [idle] = httpx.get(url, headers=headers, timeout=60).json()
        assert idle["id"] == 0 and idle["n_ctx"] == 1024 and not idle["is_processing"]
        assert idle["n_prompt_tokens"] == 0 and idle["next_token"]["n_decoded"] == 0
        assert httpx.get(f"{url}?fail_on_no_slot=1", headers=headers, timeout=60).is_success

        with grpc.insecure_channel(served[0].target) as channel:
            stream = pb_grpc.InferenceStub(channel).Generate(
                story, metadata=token_metadata(TOKEN), timeout=60
            )
            next(stream)  # decoding has begun
            [busy] = httpx.get(url, headers=headers, timeout=60).json()
            refused = httpx.get(f"{url}?fail_on_no_slot=1", headers=headers, timeout=60)
            ended = [c for c in stream if c.HasField("usage")][-1].usage
        assert busy["is_processing"] and busy["n_prompt_tokens"] == ended.prompt_tokens
        assert 0 < busy["next_token"]["n_decoded"] <= ended.completion_tokens
        assert refused.status_code == 503 and "no slot" in refused.json()["error"]["message"]
        [after] = httpx.get(url, headers=headers, timeout=60).json()
        assert not after["is_processing"] and after["n_held_tokens"] >= ended.prompt_tokens


def test_only_pages_of_allowed_origins_may_call_it_from_a_browser(
    served: tuple[ServerProcess, int, ServerProcess, int],
) -> None:
    import httpx

    from services.core.config import TransportSettings

    _, runtime_http, _, router_http = served
    page, other = "http://dash.local:3000", "http://elsewhere.example"
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    with httpx.Client(base_url=f"http://127.0.0.1:{runtime_http}", timeout=60) as client:
        allowed = client.options("/v1/predict", headers={"Origin": page, **preflight})
        assert allowed.status_code == 204
        assert allowed.headers["Access-Control-Allow-Origin"] == page
        assert "authorization" in allowed.headers["Access-Control-Allow-Headers"].lower()
        refused = client.options("/v1/predict", headers={"Origin": other, **preflight})
        assert refused.status_code == 403 and "--http-allowed-origins" in refused.text
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        answered = client.post("/v1/predict", json={"inputs": {"country": "Italy"}},
                               headers={"Origin": page, **bearer})  # fmt: skip
        assert answered.status_code == 200
        assert answered.headers["Access-Control-Allow-Origin"] == page
        unlisted = client.get("/health", headers={"Origin": other})
        assert "Access-Control-Allow-Origin" not in unlisted.headers
    with socket.create_connection(("127.0.0.1", runtime_http), timeout=30) as raw:
        # A header line over http.server's limit: refused before any header is read.
        raw.sendall(b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 431")
    with httpx.Client(base_url=f"http://127.0.0.1:{router_http}", timeout=60) as client:
        assert client.options("/v1/predict", headers={"Origin": page}).status_code == 403  # none
    with pytest.raises(ValueError, match=r"http_allowed_origins: 'dash\.local/app' is not"):
        TransportSettings(http_allowed_origins=["dash.local/app"])
    assert TransportSettings(http_allowed_origins=["*"]).http_allowed_origins == ["*"]
