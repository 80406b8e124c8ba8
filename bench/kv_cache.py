"""What a quantized KV cache saves and costs: the same batching runtime with an f16, q8_0 and
q4_0 cache (`--kv-cache-type`), one at a time on the same host.

For each: the runtime's resident memory once loaded and its peak after two concurrent calls
with long prompts, the prompt and generation speed of those calls, and whether each greedy
answer is the f16 cache's text.
"""

from __future__ import annotations

import statistics
import threading
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.results import write_results
from services.core.client import InferenceClient
from testkit.processes import smollm2_gguf, start_runtime

THREADS = 2
N_CTX = 4096
PARALLEL = 2
MAX_TOKENS = 32
TYPES = ("f16", "q8_0", "q4_0")
DOCUMENT = " ".join(f"Line {i}: the edge router keeps answers local unless its confidence is low."
                    for i in range(90))  # fmt: skip
QUESTIONS = ("Summarise the document in one sentence.", "What does the router do?")


def _memory_mb(pid: int) -> dict[str, float]:
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "VmHWM")))
    return {key: int(value.split()[0]) / 1024 for key, value in fields.items()}


def _measure(kv_cache_type: str) -> dict[str, Any]:
    server = start_runtime(
        "--model", str(smollm2_gguf()), "--n-ctx", str(N_CTX), "--parallel", str(PARALLEL),
        "--kv-cache-type", kv_cache_type, env={"EDGEDISTILL_N_THREADS": str(THREADS)},
    )  # fmt: skip
    try:
        loaded = _memory_mb(server.proc.pid)["VmRSS"]
        answers: dict[str, Any] = {}
        with InferenceClient(server.target, timeout_s=600) as client:

            def ask(question: str) -> None:
                chunks = list(client.generate([("user", f"{DOCUMENT}\n\n{question}")],
                                              max_tokens=MAX_TOKENS, temperature=0))  # fmt: skip
                answers[question] = chunks

            callers = [threading.Thread(target=ask, args=(q,)) for q in QUESTIONS]
            for caller in callers:
                caller.start()
            for caller in callers:
                caller.join()
        peak = _memory_mb(server.proc.pid)["VmHWM"]
    finally:
        server.terminate()
    lasts = [chunks[-1] for chunks in answers.values()]
    prompt_rate = [last.usage.prompt_tokens / last.time_to_first_token_ms * 1000 for last in lasts]
    decode_rate = [(last.usage.completion_tokens - 1)
                   / (last.latency_ms - last.time_to_first_token_ms) * 1000
                   for last in lasts]  # fmt: skip
    return {
        "loaded_rss_mb": loaded, "peak_rss_mb": peak,
        "prompt_tokens": lasts[0].usage.prompt_tokens,
        "prompt_tokens_per_s": statistics.mean(prompt_rate),
        "decode_tokens_per_s": statistics.mean(decode_rate),
        "texts": {q: "".join(c.text for c in chunks) for q, chunks in answers.items()},
    }  # fmt: skip


def main() -> None:
    console = Console()
    measured = {kind: _measure(kind) for kind in TYPES}
    base = measured["f16"]
    table = Table(title=f"KV cache type: SmolLM2-135M Q4_1, --parallel {PARALLEL}, --n-ctx "
                  f"{N_CTX}, {THREADS} threads, two concurrent greedy calls of "
                  f"{base['prompt_tokens']} prompt tokens")  # fmt: skip
    for column in ("cache", "RSS loaded MB", "RSS peak MB", "vs f16", "prompt tok/s",
                   "decode tok/s", "same text as f16"):  # fmt: skip
        table.add_column(column, justify="left" if column == "cache" else "right")
    for kind, figures in measured.items():
        same = sum(figures["texts"][q] == base["texts"][q] for q in QUESTIONS)
        figures["same_text_as_f16"] = same
        figures["peak_vs_f16"] = figures["peak_rss_mb"] / base["peak_rss_mb"]
        table.add_row(kind, f"{figures['loaded_rss_mb']:.0f}", f"{figures['peak_rss_mb']:.0f}",
                      f"{figures['peak_vs_f16']:.2f}x", f"{figures['prompt_tokens_per_s']:.0f}",
                      f"{figures['decode_tokens_per_s']:.1f}",
                      f"{same}/{len(QUESTIONS)}")  # fmt: skip
    console.print(table)
    write_results(
        "kv_cache",
        {"model": "SmolLM2-135M-Instruct Q4_1", "threads": THREADS, "n_ctx": N_CTX,
         "parallel": PARALLEL, "max_tokens": MAX_TOKENS},
        {"types": measured},
    )  # fmt: skip
