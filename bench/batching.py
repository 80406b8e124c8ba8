"""Continuous batching and prefix reuse against llama-cpp-python's own server.

Side by side in one run, same GGUF, same prompts, same max_tokens, greedy, the same 2 threads,
at concurrency 1, 4, 8 and 16, two workloads:
  predict  ticket-triage dev tickets in the DSPy prompt, 32 tokens: prompt-heavy (each call
           evaluates ~100 tokens of its own beyond the program prefix to generate ~25)
  chat     short chat requests, 128 tokens: decode-heavy, where batching pays
and three systems:
  (a) llama_cpp.server   llama-cpp-python's OpenAI-compatible server (streamed chat completions)
  (b) runtime, serial    our gRPC runtime with --parallel 1 (batching off)
  (c) runtime, batched   our gRPC runtime with --parallel 16 (batching and prefix reuse on)
The GGUF is the embedded SmolLM2 re-quantized to Q8_0, the type the build ships by default
(BENCH_GGUF=path picks another). The type matters on a CPU: llama.cpp multiplies several rows
of Q8_0 (or Q4_0) activations with one GEMM (tinyBLAS) that reuses each weight load across the
batch, while Q4_1 and the K-quants go row by row, so a batch costs about as much as its rows
decoded one at a time. Servers run one at a time so they never share the cores. Then,
in-process: a Predict prompt's time to first token with the program prefix warm vs cold, and
the single-stream decode speed against this machine's memory-bandwidth roofline.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from bench.results import write_results
from services.core.api import pb
from services.core.client import InferenceClient
from services.core.program import ProgramSpec, PromptCodec
from services.core.stats import percentile
from testkit.processes import REPO, free_port, smollm2_gguf, start_runtime

THREADS = 2
MAX_TOKENS = 32  # a ticket-triage answer is ~25 tokens
CHAT_MAX_TOKENS = 128
N_CTX = 1024
CONCURRENCY = (1, 4, 8, 16)
PARALLEL = 16
Chat = list[dict[str, str]]


CHAT_TOPICS = (
    "a lighthouse keeper", "the history of bread", "how tides work", "a robot learning to paint",
    "why the sky is blue", "a city under the sea", "the first winter on Mars", "a lost violin",
    "how vaccines train the immune system", "a dragon who hates gold", "the life of a honeybee",
    "a train that never stops", "how compilers work", "a garden on a rooftop",
    "the invention of the printing press", "a cat who runs a bakery",
)  # fmt: skip


@dataclass
class Workload:
    name: str
    prompts: list[Chat]
    max_tokens: int
    requests: Callable[[int], int]  # calls at a concurrency level


@dataclass
class CallTiming:
    latency_s: float
    first_token_s: float
    tokens: int


@dataclass
class LevelResult:
    concurrency: int
    tokens_per_s: float
    p50_s: float
    p95_s: float
    ttft_p50_s: float
    calls_per_s: float


def ticket_messages(count: int) -> tuple[PromptCodec, list[list[dict[str, str]]]]:
    from examples.ticket_triage.program import TicketTriage

    codec = PromptCodec(ProgramSpec.from_signature(TicketTriage, name="ticket-triage"))
    dev = REPO / "examples" / "ticket_triage" / "dev.jsonl"
    tickets = [json.loads(line)["ticket"] for line in dev.read_text().splitlines()[:count]]
    return codec, [codec.format_messages({"ticket": t}) for t in tickets]


def run_level(
    call: Callable[[list[dict[str, str]]], CallTiming],
    prompts: list[list[dict[str, str]]],
    concurrency: int,
) -> LevelResult:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        timings = list(pool.map(call, prompts))
    wall = time.perf_counter() - started
    latencies = [t.latency_s for t in timings]
    return LevelResult(
        concurrency=concurrency,
        tokens_per_s=sum(t.tokens for t in timings) / wall,
        p50_s=percentile(latencies, 0.5),
        p95_s=percentile(latencies, 0.95),
        ttft_p50_s=percentile([t.first_token_s for t in timings], 0.5),
        calls_per_s=len(timings) / wall,
    )


def story_chat(topic: str) -> Chat:
    return [{"role": "user", "content": f"Write a short story about {topic}."}]


def workloads(levels: tuple[int, ...] = CONCURRENCY) -> tuple[PromptCodec, list[Workload]]:
    def predict_calls(concurrency: int) -> int:
        return max(8, 3 * concurrency)

    def chat_calls(concurrency: int) -> int:
        return max(4, 2 * concurrency)

    codec, tickets = ticket_messages(predict_calls(max(levels)))
    topics = CHAT_TOPICS * -(-chat_calls(max(levels)) // len(CHAT_TOPICS))
    return codec, [
        Workload("predict", tickets, MAX_TOKENS, predict_calls),
        Workload("chat", [story_chat(t) for t in topics], CHAT_MAX_TOKENS, chat_calls),
    ]


Results = dict[str, list[LevelResult]]  # per workload, one result per concurrency level


def run_workloads(
    make_call: Callable[[int], Callable[[Chat], CallTiming]], loads: list[Workload],
    levels: tuple[int, ...] = CONCURRENCY,
) -> Results:  # fmt: skip
    results: Results = {}
    for load in loads:
        call = make_call(load.max_tokens)
        call(load.prompts[0])  # warm-up
        results[load.name] = [run_level(call, load.prompts[: load.requests(c)], c) for c in levels]
    return results


def bench_llama_cpp_server(gguf: Path, loads: list[Workload]) -> Results:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", str(N_CTX), "--n_threads", str(THREADS),
         "--n_threads_batch", str(THREADS),
         # its default interrupts a running stream when another request arrives
         "--interrupt_requests", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        _wait_http(f"http://127.0.0.1:{port}/v1/models", proc)
        http = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64))

        def make_call(max_tokens: int) -> Callable[[Chat], CallTiming]:
            def call(messages: Chat) -> CallTiming:
                body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0,
                        "stream": True}  # fmt: skip
                started = time.perf_counter()
                first = None
                tokens = 0
                with http.stream("POST", url, json=body) as response:
                    response.raise_for_status()
                    for line in response.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        delta = json.loads(line[6:])["choices"][0]["delta"]
                        if delta.get("content"):
                            first = first or time.perf_counter() - started
                            tokens += 1  # one chunk per generated token
                return CallTiming(time.perf_counter() - started, first or 0.0, tokens)

            return call

        return run_workloads(make_call, loads)
    finally:
        proc.terminate()
        proc.wait(30)


def bench_runtime(
    gguf: Path, program: Path, parallel: int, loads: list[Workload],
    levels: tuple[int, ...] = CONCURRENCY, n_gpu_layers: int = 0,
) -> Results:  # fmt: skip
    server = start_runtime(
        "--model", str(gguf), "--program", str(program), "--n-ctx", str(N_CTX),
        "--parallel", str(parallel), "--max-queue", str(max(64, 2 * max(levels))),
        "--n-gpu-layers", str(n_gpu_layers), env={"EDGEDISTILL_N_THREADS": str(THREADS)},
    )  # fmt: skip
    try:
        client = InferenceClient(server.target, timeout_s=600)

        def make_call(max_tokens: int) -> Callable[[Chat], CallTiming]:
            def call(messages: Chat) -> CallTiming:
                started = time.perf_counter()
                first = None
                last = None
                pairs = [(m["role"], m["content"]) for m in messages]
                for chunk in client.generate(pairs, max_tokens=max_tokens, temperature=0):
                    if chunk.text and first is None:
                        first = time.perf_counter() - started
                    last = chunk
                assert last is not None and last.finish_reason != pb.FINISH_REASON_UNSPECIFIED
                return CallTiming(
                    time.perf_counter() - started, first or 0.0, last.usage.completion_tokens
                )

            return call

        results = run_workloads(make_call, loads, levels)
        client.close()
        return results
    finally:
        server.terminate()


def prefix_ttft(
    gguf: Path, codec: PromptCodec, prompts: list[list[dict[str, str]]]
) -> tuple[float, float, int]:
    """Median time to the first token of a Predict prompt: cold (whole prompt) vs warm prefix."""
    from services.runtime.backends import TokenPiece
    from services.runtime.backends.base import program_prefix
    from services.runtime.backends.llamacpp_batched import BatchedLlamaCpp
    from services.runtime.predict import predict_params

    params = predict_params(MAX_TOKENS, seed=0)
    engine = BatchedLlamaCpp(gguf, n_ctx=N_CTX, n_threads=THREADS, parallel=1)

    def first_token(messages: list[dict[str, str]]) -> float:
        engine.clear_cache()  # no reuse from the previous call: only the warm prefix, if any
        prompt = engine.prepare(messages)
        started = time.perf_counter()
        for event in engine.generate(prompt, params, lambda: False):
            if isinstance(event, TokenPiece):
                return time.perf_counter() - started
        return time.perf_counter() - started

    try:
        first_token(prompts[0])  # warm-up
        cold = [first_token(m) for m in prompts[:12]]
        engine.warm_prefix(program_prefix(engine, codec))
        warm = [first_token(m) for m in prompts[:12]]
        return statistics.median(cold), statistics.median(warm), engine.prefix_tokens
    finally:
        engine.close()


def decode_tokens_per_s(gguf: Path, tokens: int = 128, n_gpu_layers: int = 0) -> float:
    """One stream's decode speed in-process: tokens after the first over the time they took."""
    from services.core.sampling import GenerationParams
    from services.runtime.backends import TokenPiece
    from services.runtime.backends.llamacpp_batched import BatchedLlamaCpp

    engine = BatchedLlamaCpp(
        gguf, n_ctx=N_CTX, n_threads=THREADS, parallel=1, n_gpu_layers=n_gpu_layers
    )
    params = GenerationParams(max_tokens=tokens, temperature=0.0, top_p=1.0, seed=0, stop=(),
                              logprobs=False)  # fmt: skip
    story = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    try:
        stamps = [
            time.perf_counter()
            for event in engine.generate(engine.prepare(story), params, lambda: False)
            if isinstance(event, TokenPiece)
        ]
    finally:
        engine.close()
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def batched_decode_tokens_per_s(gguf: Path, streams: int, tokens: int = 128) -> float:
    """In-process, no server: `streams` chat requests started together and decoded as one
    batch until each has `tokens` (prompts included): generated tokens per second."""
    from services.core.sampling import GenerationParams
    from services.runtime.backends import Finished, TokenPiece
    from services.runtime.backends.llamacpp_batched import BatchedLlamaCpp

    engine = BatchedLlamaCpp(gguf, n_ctx=N_CTX, n_threads=THREADS, parallel=streams)
    params = GenerationParams(max_tokens=tokens, temperature=0.0, top_p=1.0, seed=0, stop=(),
                              logprobs=False)  # fmt: skip
    try:
        for index, topic in enumerate(CHAT_TOPICS[:streams]):
            engine.start(index, engine.prepare(story_chat(topic)), params)
        started = time.perf_counter()
        generated, finished = 0, 0
        while finished < streams:
            events = engine.step()
            generated += sum(isinstance(e, TokenPiece) for _, e in events)
            finished += sum(isinstance(e, Finished) for _, e in events)
        return generated / (time.perf_counter() - started)
    finally:
        engine.close()


def memory_bandwidth_gb_s(threads: int = THREADS, megabytes: int = 512) -> float:
    """A copy benchmark: bytes read plus bytes written per second, best of 5, `threads` copiers."""
    n = megabytes * (1 << 20) // 8
    source = np.ones(n)
    target = np.empty_like(source)
    parts = np.array_split(np.arange(n), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]

    def copy(lo: int, hi: int) -> None:
        np.copyto(target[lo:hi], source[lo:hi])

    best = float("inf")
    for _ in range(5):
        workers = [threading.Thread(target=copy, args=b) for b in bounds]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - started)
    return 2 * source.nbytes / best / 1e9


def model_bytes_per_token(gguf: Path) -> int:
    """Bytes a decode step reads: every weight tensor once (the KV cache is small here)."""
    from services.core.gguf_metadata import open_gguf

    reader = open_gguf(gguf)
    return sum(int(t.n_bytes) for t in reader.tensors)


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"server at {url} did not start") from None
            time.sleep(0.3)


def shipped_type_gguf() -> Path:
    """The embedded SmolLM2 as Q8_0 (made once, 1 s, kept under build/bench/)."""
    from services.builder.export import quantize

    path = REPO / "build" / "bench" / "SmolLM2-135M-Instruct.Q8_0.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        quantize(smollm2_gguf(), partial, "Q8_0", THREADS)
        partial.replace(path)
    return path


def print_workload(
    console: Console, gguf: Path, load: Workload, results: dict[str, Results]
) -> None:
    table = Table(
        title=f"{load.name}: {gguf.name}, greedy, max_tokens={load.max_tokens}, {THREADS} threads"
    )
    for column in ("system", "concurrency", "tokens/s", "p50 s", "p95 s", "TTFT p50 s"):
        table.add_column(column, justify="left" if column == "system" else "right")
    for label, per_load in results.items():
        for level in per_load[load.name]:
            table.add_row(
                label, str(level.concurrency), f"{level.tokens_per_s:.1f}",
                f"{level.p50_s:.2f}", f"{level.p95_s:.2f}", f"{level.ttft_p50_s:.2f}",
            )  # fmt: skip
    console.print(table)
    a, b, c = (per_load[load.name] for per_load in results.values())
    ratios = Table(title=f"{load.name}: aggregate tokens/s ratios")
    for column in ("concurrency", "(c)/(a)", "(c)/(b)"):
        ratios.add_column(column, justify="right")
    for la, lb, lc in zip(a, b, c, strict=True):
        ratios.add_row(str(lc.concurrency), f"{lc.tokens_per_s / la.tokens_per_s:.2f}x",
                       f"{lc.tokens_per_s / lb.tokens_per_s:.2f}x")  # fmt: skip
    console.print(ratios)
    at8 = [next(x for x in levels if x.concurrency == 8) for levels in (a, b, c)]
    vs_b = at8[2].tokens_per_s / at8[1].tokens_per_s
    vs_a = at8[2].tokens_per_s / at8[0].tokens_per_s
    console.print(
        f"{load.name} at concurrency 8: (c) is {vs_b:.2f}x (b) (goal >= 2.5x: "
        f"{'met' if vs_b >= 2.5 else 'missed'}) and {vs_a:.2f}x (a) (goal >= 2x: "
        f"{'met' if vs_a >= 2 else 'missed'})"
    )


def main() -> None:
    console = Console()
    gguf = Path(os.environ["BENCH_GGUF"]) if "BENCH_GGUF" in os.environ else shipped_type_gguf()
    codec, loads = workloads()
    program = Path(tempfile.mkdtemp()) / "program.json"
    program.write_text(codec.spec.model_dump_json())
    systems = {
        "(a) llama_cpp.server": lambda: bench_llama_cpp_server(gguf, loads),
        "(b) runtime, batching off": lambda: bench_runtime(gguf, program, 1, loads),
        f"(c) runtime, batching on (--parallel {PARALLEL})": lambda: bench_runtime(
            gguf, program, PARALLEL, loads
        ),
    }
    results: dict[str, Results] = {}
    for label, run in systems.items():
        console.print(f"running {label} ...")
        results[label] = run()
    for load in loads:
        print_workload(console, gguf, load, results)

    cold, warm, prefix = prefix_ttft(gguf, codec, loads[0].prompts)
    console.print(
        f"Predict time to first token: cold {cold * 1000:.0f} ms, warm prefix ({prefix} tokens) "
        f"{warm * 1000:.0f} ms: {warm / cold:.2f}x (goal <= 0.3x: "
        f"{'met' if warm / cold <= 0.3 else 'missed'})"
    )

    bandwidth = memory_bandwidth_gb_s()
    per_token = model_bytes_per_token(gguf)
    roofline = bandwidth * 1e9 / per_token
    single = decode_tokens_per_s(gguf)
    console.print(
        f"Roofline: copy bandwidth {bandwidth:.1f} GB/s ({THREADS} threads), "
        f"{per_token / 1e6:.1f} MB of weights read per token -> at most {roofline:.0f} tokens/s "
        f"single-stream; measured decode {single:.1f} tokens/s = {single / roofline:.0%} of it"
    )
    one, eight = batched_decode_tokens_per_s(gguf, 1), batched_decode_tokens_per_s(gguf, 8)
    write_results(
        "batching",
        {"gguf": gguf.name, "threads": THREADS, "parallel": PARALLEL,
         "max_tokens": {load.name: load.max_tokens for load in loads}},
        {"systems": {label: {workload: [asdict(level) for level in levels]
                             for workload, levels in by_workload.items()}
                     for label, by_workload in results.items()},
         "prefix_ttft": {"cold_s": cold, "warm_s": warm, "prefix_tokens": prefix,
                         "warm_vs_cold": warm / cold},
         "roofline": {"copy_gb_s": bandwidth, "weights_mb_per_token": per_token / 1e6,
                      "bound_tokens_per_s": roofline, "decode_tokens_per_s": single},
         "ceiling": {"one_stream_tokens_per_s": one, "eight_streams_tokens_per_s": eight}},
    )  # fmt: skip
    console.print(
        f"Batching's ceiling here (in-process, no server, chat prompts, {CHAT_MAX_TOKENS} "
        f"tokens): 8 streams decode together at {eight:.1f} tokens/s vs 1 stream at {one:.1f}: "
        f"{eight / one:.2f}x is the most batching can add at 8 callers on this machine (a step "
        f"of 8 rows costs {8 * one / eight:.1f}x a step of 1: the CPU is compute-bound, not "
        "bandwidth-bound, so batched rows share little)"
    )


if __name__ == "__main__":
    main()
