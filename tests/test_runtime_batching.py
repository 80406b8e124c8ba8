"""Continuous batching and prefix reuse change speed, never answers (real SmolLM2, real gRPC)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from services.core.api import pb, pb_grpc
from services.core.client import sampling
from services.runtime.backends.base import usable_cache
from services.runtime.backends.llamacpp_batched import pick_slot, prompt_piece
from testkit.processes import ServerProcess, start_runtime
from testkit.scratch import scratch

COUNTRIES = ["Italy", "Peru", "Kenya", "Norway", "Vietnam", "Chile", "Egypt", "Canada"]
PROMPTS = [
    ("Write a haiku about rain.", 40),
    ("List three prime numbers.", 12),
    ("Explain what DNS does in one sentence.", 64),
    ("Say hello in French.", 5),
    ("Name a color.", 1),
    ("Write a long story about a lighthouse keeper.", 90),
    ("What is 2+2?", 20),
    ("Describe the sea.", 33),
]


def serve(gguf: Path, program: Path, *extra: str) -> ServerProcess:
    return start_runtime(
        "--model", str(gguf), "--program", str(program), "--n-ctx", "1024",
        "--max-queue", "32", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module", params=["Q4_1", "Q8_0"])
def model(
    request: pytest.FixtureRequest, gguf_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """The embedded SmolLM2 (Q4_1: llama.cpp multiplies row by row) and as Q8_0, the type the
    build ships (several rows go through one GEMM, so batched rows take another kernel)."""
    if request.param == "Q4_1":
        yield gguf_path
        return
    from services.builder.export import quantize

    with scratch(tmp_path_factory, "q8") as folder:
        path = folder / "SmolLM2-135M-Instruct.Q8_0.gguf"
        quantize(gguf_path, path, "Q8_0", 2)
        yield path


@pytest.fixture(scope="module")
def servers(model: Path, program_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    serial = serve(model, program_path, "--parallel", "1")
    batched = serve(model, program_path, "--parallel", "8", "--n-batch", "64")
    yield serial, batched
    serial.terminate()
    batched.terminate()


def calls() -> list[pb.PredictRequest | pb.GenerateRequest]:
    greedy = {"temperature": 0.0}
    requests: list[pb.PredictRequest | pb.GenerateRequest] = [
        pb.PredictRequest(
            inputs={"country": c},
            options=sampling(max_tokens=24, **greedy),
            include_raw_text=True,
        )
        for c in COUNTRIES
    ]
    requests += [
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content=text)],
            options=sampling(max_tokens=n, **greedy),
        )
        for text, n in PROMPTS
    ]
    return requests


def answer(
    stub: pb_grpc.InferenceStub, request: pb.PredictRequest | pb.GenerateRequest
) -> tuple[str, int, int]:
    """(text, completion tokens, cached prompt tokens) of one call."""
    if isinstance(request, pb.PredictRequest):
        reply = stub.Predict(request, timeout=120)
        return reply.raw_text, reply.usage.completion_tokens, reply.usage.cached_prompt_tokens
    text, usage = "", pb.Usage()
    for chunk in stub.Generate(request, timeout=120):
        text += chunk.text
        if chunk.HasField("usage"):
            usage = chunk.usage
    return text, usage.completion_tokens, usage.cached_prompt_tokens


def test_batched_greedy_outputs_are_token_for_token_the_serial_ones(
    servers: tuple[ServerProcess, ServerProcess],
) -> None:
    serial, batched = servers
    requests = calls()
    serial_stub = pb_grpc.InferenceStub(grpc.insecure_channel(serial.target))
    expected = [answer(serial_stub, r) for r in requests]  # one at a time

    batched_stub = pb_grpc.InferenceStub(grpc.insecure_channel(batched.target))
    # All 16 at once: 8 decode together, 8 join as slots free up (reusing what the slots
    # hold); prompts are evaluated in pieces of up to 64 tokens between decode steps.
    with ThreadPoolExecutor(len(requests)) as pool:
        got = list(pool.map(lambda r: answer(batched_stub, r), requests))

    for request, (want_text, want_n, _), (text, n, _) in zip(requests, expected, got, strict=True):
        assert (text, n) == (want_text, want_n), request
    # Generate calls stop at their own max_tokens, whatever their neighbours do.
    for (_, max_tokens), (_, n, _) in zip(PROMPTS, got[len(COUNTRIES) :], strict=True):
        assert n <= max_tokens


def test_predict_reuses_the_program_prefix(servers: tuple[ServerProcess, ServerProcess]) -> None:
    serial, batched = servers
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(batched.target))
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.parallel == 8
    assert info.cached_prefix_tokens > 50  # instructions, field structure and two demos
    # A country no earlier call asked about: a slot may still hold an earlier call's
    # prompt and share a few more tokens with this one (its field header), never the input.
    request = pb.PredictRequest(inputs={"country": "Japan"}, include_raw_text=True)
    reply = stub.Predict(request, timeout=120)
    text, cached = reply.raw_text, reply.usage.cached_prompt_tokens
    # Every Predict starts from the warm prefix: only what follows it is evaluated.
    assert info.cached_prefix_tokens <= cached < reply.usage.prompt_tokens
    # Its slot is free again and holds the call's prompt for a next one sharing it.
    slots = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).slots
    assert [s.id for s in slots] == list(range(8)) and not any(s.processing for s in slots)
    assert max(s.held_tokens for s in slots) >= reply.usage.prompt_tokens
    # ... and answers as the whole prompt evaluated at once does (no prefix on the serial one)
    assert text == answer(pb_grpc.InferenceStub(grpc.insecure_channel(serial.target)), request)[0]
    assert text.startswith("[[ ## capital ## ]]\n") and len(text) > len("[[ ## capital ## ]]\n")


def test_prefix_reuse_off_evaluates_the_whole_prompt(
    model: Path, program_path: Path, servers: tuple[ServerProcess, ServerProcess]
) -> None:
    serial, _ = servers
    cold = serve(model, program_path, "--parallel", "2", "--no-prefix-cache")
    try:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(cold.target))
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).cached_prefix_tokens == 0
        request = pb.PredictRequest(
            inputs={"country": "Peru"}, options=sampling(temperature=0), include_raw_text=True
        )
        text, n, cached = answer(stub, request)
        assert cached == 0 and "Peru" in text
        serial_stub = pb_grpc.InferenceStub(grpc.insecure_channel(serial.target))
        assert (text, n) == answer(serial_stub, request)[:2]
    finally:
        cold.terminate()


def test_a_cancelled_call_frees_its_slot_for_the_others(
    servers: tuple[ServerProcess, ServerProcess],
) -> None:
    _, batched = servers
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(batched.target))
    long_story = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content="Write a very long story about a cat.")],
        options=sampling(max_tokens=400, temperature=0),
    )
    # Fill every slot with a call whose deadline ends it early...
    with ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(lambda: list(stub.Generate(long_story, timeout=1.0))) for _ in range(8)
        ]
        for future in futures:
            with pytest.raises(grpc.RpcError) as caught:
                future.result()
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # ...then a new call gets a slot at once and answers in full.
    reply = stub.Predict(pb.PredictRequest(inputs={"country": "Italy"}), timeout=20)
    assert reply.outcome == pb.PREDICT_OUTCOME_PARSED


@pytest.mark.parametrize(
    ("pending", "budget", "at_start", "take"),
    [
        (40, 64, False, 40),  # the whole prompt fits
        (65, 64, False, 63),  # never leave one token behind
        (65, 64, True, 63),
        (3, 2, False, 0),  # a one-token piece after position 0: wait for room
        (1, 64, True, 1),  # a one-token prompt is evaluated alone, as a lone sequence does
        (2, 2, False, 2),
        (100, 0, False, 0),
    ],
)
def test_prompt_pieces_are_never_one_token_after_position_zero(
    pending: int, budget: int, at_start: bool, take: int
) -> None:
    assert prompt_piece(pending, budget, at_start=at_start) == take


@pytest.mark.parametrize(
    ("shared", "last", "cached"),
    [(0, 10, 0), (5, 10, 5), (9, 10, 9), (10, 10, 9), (30, 10, 9), (0, 0, 0), (4, 0, 0)],
)
def test_a_prompt_evaluates_at_least_two_tokens(shared: int, last: int, cached: int) -> None:
    assert usable_cache(shared, last) == cached


def test_idle_slots_hold_the_warm_prefix_from_load(gguf_path: Path, program_path: Path) -> None:
    """Warming the prefix also copies it into every idle slot, so a slot's first call does not
    pay llama.cpp's stream copy; clear_cache() brings slots back to just the prefix."""
    from services.core.program import ProgramSpec, PromptCodec
    from services.runtime.backends import Finished
    from services.runtime.backends.base import program_prefix
    from services.runtime.backends.llamacpp_batched import BatchedLlamaCpp
    from services.runtime.predict import predict_params

    engine = BatchedLlamaCpp(gguf_path, n_ctx=1024, n_threads=2, parallel=2)
    try:
        codec = PromptCodec(ProgramSpec.load(program_path))
        engine.warm_prefix(program_prefix(engine, codec))
        assert engine.prefix_tokens > 50
        assert all(engine._slot_tokens[slot] == engine._prefix for slot in range(2))

        def run_together(countries: list[str]) -> list[Finished]:
            params = predict_params(8, seed=0)
            for country in countries:
                engine.start(country, engine.prepare(codec.format_messages({"country": country})),
                             params)  # fmt: skip
            done: dict[str, Finished] = {}
            while len(done) < len(countries):
                for owner, event in engine.step():
                    if isinstance(event, Finished):
                        done[owner] = event
            return [done[c] for c in countries]

        first = run_together(["Italy", "Peru"])  # one call in each slot
        assert [f.cached_prompt_tokens for f in first] == [engine.prefix_tokens] * 2
        engine.clear_cache()
        assert all(engine._slot_tokens[slot] == engine._prefix for slot in range(2))
        again = run_together(["Peru", "Italy"])
        assert [f.cached_prompt_tokens for f in again] == [engine.prefix_tokens] * 2
    finally:
        engine.close()


def test_raw_generation_reserves_no_kv_stream_for_a_prefix(gguf_path: Path) -> None:
    """Serving a bare GGUF (no program) with --parallel N holds N streams of n_ctx cells, not
    N + 1: the warm prefix's stream is made only for a program's prefix."""
    import llama_cpp

    from services.core.sampling import GenerationParams
    from services.runtime.backends import Finished
    from services.runtime.backends.llamacpp_batched import BatchedLlamaCpp

    params = GenerationParams(max_tokens=6, temperature=0.0, top_p=1.0, seed=0, stop=(),
                              logprobs=False)  # fmt: skip
    hello = [{"role": "user", "content": "Say hello in French."}]
    texts, cells = [], []
    for prefixes in (0, 1):
        engine = BatchedLlamaCpp(gguf_path, n_ctx=512, n_threads=2, parallel=2,
                                 prefixes=prefixes)  # fmt: skip
        try:
            cells.append(llama_cpp.llama_n_ctx(engine._ctx.ctx))
            events = list(engine.generate(engine.prepare(hello), params, lambda: False))
            texts.append("".join(e.text for e in events if not isinstance(e, Finished)))
            if prefixes == 0:
                with pytest.raises(ValueError, match="no warm prefix"):
                    engine.warm_prefix(engine.prepare(hello).tokens or [])
        finally:
            engine.close()
    assert cells == [512 * 2, 512 * 3]
    assert texts[0] == texts[1] and texts[0]


@pytest.mark.parametrize(
    ("reusable", "slot"),
    [
        ({0: 260, 3: 260, 9: 260}, 0),  # all hold the program prefix: the lowest
        ({5: 3, 2: 3, 7: 3}, 2),
        ({1: 260, 4: 262}, 1),  # two more tokens are not worth a wider step
        ({1: 3, 6: 400}, 6),  # a chat's next turn: its slot holds the conversation
    ],
)
def test_a_new_request_takes_the_lowest_slot_unless_another_saves_real_work(
    reusable: dict[int, int], slot: int
) -> None:
    assert pick_slot(reusable) == slot


def test_a_prefix_the_context_partly_holds_is_completed_not_evaluated_again(
    gguf_path: Path,
) -> None:
    """--parallel 1: a program prefix not saved yet (the calls so far ended before it did) is
    evaluated from where the context's match ends, then kept; the call reports what it found
    cached. It was evaluated from the start (a cold call's time, measured: ~1.6 s more on a
    receipts program after two calls with empty inputs)."""
    from services.runtime.backends import Finished, GenerationParams
    from services.runtime.backends.base import PreparedPrompt
    from services.runtime.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(gguf_path, n_ctx=512, n_threads=2)
    try:
        chat = backend.prepare([{"role": "user", "content": "Name a colour. " * 20}])
        assert chat.tokens is not None
        prefix, other = list(chat.tokens[:-6]), list(chat.tokens[-6:])
        backend.set_prefixes([prefix])
        llm, evaluated = backend.llama, []
        real_eval = llm.eval
        llm.eval = lambda tokens: (evaluated.append(len(tokens)), real_eval(tokens))[1]
        params = GenerationParams(max_tokens=1, temperature=0.0, top_p=1.0, seed=0)

        def call(tokens: list[int]) -> tuple[int, int]:
            evaluated.clear()
            prompt = PreparedPrompt(messages=(), text="", tokens=tuple(tokens))
            events = list(backend.generate(prompt, params, lambda: False))
            (finished,) = [e for e in events if isinstance(e, Finished)]
            return sum(evaluated), finished.cached_prompt_tokens

        call(prefix[:-3] + other[:1])  # ends before the prefix does: nothing is saved
        assert call(prefix + other[:3]) == (3 + 3, len(prefix) - 3)  # its last 3, then 3 more
        call(other * 3)  # another prompt takes the context
        assert call(prefix + other[3:6]) == (3, len(prefix))  # restored from the saved state
    finally:
        backend.close()
