"""What Embed costs: vectors in-process vs through the runtime, and what embedding does to a
generation running beside it.

Side by side in one run, interleaved round by round (each round in a rotated order), same GGUF,
same texts, same threads:
  in-process   llama_cpp.Llama(embedding=True).embed (what a Python user would write)
  gRPC         Embed on a loopback runtime
  HTTP         the same runtime's OpenAI /v1/embeddings (floats, kept-alive)
for one short text, a batch of short texts and a batch of passages. Then a greedy Generate
alone vs while another client embeds passages without pause, and the runtime's resident memory
before and after its first Embed (the embedding context's cost).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.results import write_results
from services.core.client import InferenceClient
from services.core.stats import percentile
from testkit.processes import free_port, smollm2_gguf, start_runtime

THREADS = 2
EMBED_CTX = 512
ROUNDS = 15
WARMUP = 2
SHORT = [f"Ticket {i}: the VPN drops every few minutes since the update on floor {i}."
         for i in range(16)]  # fmt: skip
PASSAGES = [" ".join(f"Section {i}.{j}: the router keeps answers local unless confidence is low."
                     for j in range(12)) for i in range(4)]  # fmt: skip
STORY = [("user", "Write a long story about a lighthouse keeper and a storm.")]


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    import httpx
    import llama_cpp

    console = Console()
    gguf = smollm2_gguf()
    http_port = free_port()
    server = start_runtime(
        "--model", str(gguf), "--n-ctx", "2048", "--embed-ctx", str(EMBED_CTX),
        "--http-port", str(http_port), env={"EDGEDISTILL_N_THREADS": str(THREADS)},
    )  # fmt: skip
    llm = llama_cpp.Llama(
        str(gguf), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        n_ctx=EMBED_CTX, n_batch=EMBED_CTX, n_ubatch=EMBED_CTX, flash_attn=True,
        n_threads=THREADS, n_threads_batch=THREADS, verbose=False,
    )  # fmt: skip
    try:
        client = InferenceClient(server.target, timeout_s=300)
        http = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=300)
        first = _generation_alone(client)  # before the embedding context exists
        before_mb = _rss_mb(server.proc.pid)
        client.embed(SHORT[:1])
        after_mb = _rss_mb(server.proc.pid)
        workloads = {"one short text": SHORT[:1], f"{len(SHORT)} short texts": SHORT,
                     f"{len(PASSAGES)} passages": PASSAGES}  # fmt: skip
        tokens = {name: client.embed(texts).usage.prompt_tokens
                  for name, texts in workloads.items()}  # fmt: skip
        paths: dict[str, Callable[[list[str]], Any]] = {
            "in-process": lambda texts: llm.embed(texts, normalize=True),
            "gRPC Embed": lambda texts: client.embed(texts),
            "HTTP /v1/embeddings": lambda texts: http.post(
                "/v1/embeddings", json={"input": texts, "encoding_format": "float"}
            ).raise_for_status(),
        }
        timings: dict[tuple[str, str], list[float]] = {(w, p): [] for w in workloads for p in paths}
        order = list(paths)
        for round_index in range(WARMUP + ROUNDS):
            shift = round_index % len(order)
            for name, texts in workloads.items():
                for path in order[shift:] + order[:shift]:
                    took = _timed(lambda: paths[path](texts))  # noqa: B023
                    if round_index >= WARMUP:
                        timings[(name, path)].append(took)
        alone, beside = _generation_beside_embedding(client)
        client.close()
        http.close()
    finally:
        server.terminate()
        llm.close()

    table = Table(title=f"Embeddings: SmolLM2-135M Q4_1, mean pooling, {THREADS} threads, "
                  f"{ROUNDS} interleaved rounds")  # fmt: skip
    for column in ("texts", "tokens", "path", "p50 ms", "p95 ms", "texts/s", "p50 vs in-process"):
        table.add_column(column, justify="left" if column in ("texts", "path") else "right")
    figures: dict[str, Any] = {}
    for name, texts in workloads.items():
        base = statistics.median(timings[(name, "in-process")])
        for path in paths:
            p50 = statistics.median(timings[(name, path)])
            figures.setdefault(name, {"texts": len(texts), "tokens": tokens[name]})[path] = {
                "p50_ms": p50 * 1000, "p95_ms": percentile(timings[(name, path)], 0.95) * 1000,
                "texts_per_s": len(texts) / p50, "p50_vs_in_process": p50 / base,
            }  # fmt: skip
            table.add_row(name, str(tokens[name]), path, f"{p50 * 1000:.1f}",
                          f"{percentile(timings[(name, path)], 0.95) * 1000:.1f}",
                          f"{len(texts) / p50:.1f}", f"{p50 / base:.3f}x")  # fmt: skip
    console.print(table)
    slowdown = statistics.median(beside) / statistics.median(alone)
    after_embedding = statistics.median(alone) / statistics.median(first)
    console.print(f"greedy Generate (32 tokens), p50: {statistics.median(first) * 1000:.0f} ms "
                  f"before any Embed, {statistics.median(alone) * 1000:.0f} ms after "
                  f"({after_embedding:.2f}x), {statistics.median(beside) * 1000:.0f} ms while "
                  f"passages are embedded ({slowdown:.2f}x: their decodes take turns on the "
                  "model's thread)")  # fmt: skip
    console.print(
        f"runtime resident memory: {before_mb:.0f} MB before the first Embed, "
        f"{after_mb:.0f} MB after (the embedding context, --embed-ctx {EMBED_CTX})"
    )
    write_results(
        "embeddings",
        {"model": "SmolLM2-135M-Instruct Q4_1", "threads": THREADS, "embed_ctx": EMBED_CTX,
         "rounds": ROUNDS, "warmup": WARMUP},
        {"paths": figures,
         "generate_p50_ms": {"before_any_embed": statistics.median(first) * 1000,
                             "alone": statistics.median(alone) * 1000,
                             "after_vs_before_embed": after_embedding,
                             "beside_embedding": statistics.median(beside) * 1000,
                             "ratio": slowdown},
         "runtime_rss_mb": {"before_first_embed": before_mb, "after_first_embed": after_mb}},
    )  # fmt: skip


def _generation_alone(client: InferenceClient) -> list[float]:
    return [_timed(lambda: list(client.generate(STORY, max_tokens=32, temperature=0)))
            for _ in range(ROUNDS)]  # fmt: skip


def _generation_beside_embedding(client: InferenceClient) -> tuple[list[float], list[float]]:
    """A greedy 32-token Generate's time, alone (after embedding ran) and while another
    caller embeds passages."""

    def generate() -> None:
        list(client.generate(STORY, max_tokens=32, temperature=0))

    alone = _generation_alone(client)
    stop = threading.Event()

    def embed_without_pause() -> None:
        while not stop.is_set():
            client.embed(PASSAGES)

    embedding = threading.Thread(target=embed_without_pause)
    embedding.start()
    try:
        beside = [_timed(generate) for _ in range(ROUNDS)]
    finally:
        stop.set()
        embedding.join()
    return alone, beside
