"""When a long answer's first words reach the client: Predict vs PredictStream.

Side by side in one run, interleaved call by call (each round in a rotated order), one runtime,
the same GGUF, program and inputs, greedy: a program whose output is a reply of a few
sentences (untuned SmolLM2 writes one from its two demos). Measured at the client: Predict's
whole latency; PredictStream's time to its first delta and to its last chunk. Ratios are
against Predict's latency.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.results import write_results
from services.core.client import InferenceClient
from services.core.stats import percentile
from testkit.processes import smollm2_gguf, start_runtime

THREADS = 2
ROUNDS = 12
WARMUP = 2
MAX_TOKENS = 96
REPLY_PROGRAM = {
    "name": "support-reply",
    "instructions": "Write a short, polite reply to the customer's message.",
    "inputs": [{"name": "message", "description": "the customer's message", "type": "str"}],
    "outputs": [{"name": "reply", "description": "the reply, a few sentences", "type": "str"}],
    "demos": [
        {"message": "My order has not arrived yet.",
         "reply": "I am sorry your order is late. I have checked it: it ships tomorrow and "
                  "you will get the tracking number by email."},
        {"message": "How do I reset my password?",
         "reply": "Open the login page, choose 'Forgot password' and follow the link we email "
                  "you. It is valid for one hour."},
    ],
}  # fmt: skip
MESSAGES = [
    "The app crashes when I open settings.", "Can I change my delivery address?",
    "I was charged twice this month.", "Do you ship to Canada?",
]  # fmt: skip


def main() -> None:
    import json

    console = Console()
    with tempfile.TemporaryDirectory() as folder:
        program = Path(folder) / "program.json"
        program.write_text(json.dumps(REPLY_PROGRAM))
        server = start_runtime(
            "--model", str(smollm2_gguf()), "--program", str(program), "--n-ctx", "2048",
            env={"EDGEDISTILL_N_THREADS": str(THREADS)},
        )  # fmt: skip
        try:
            timings, tokens = _measure(InferenceClient(server.target, timeout_s=300))
        finally:
            server.terminate()
    predict = statistics.median(timings["Predict"])
    table = Table(title=f"Predict vs PredictStream: a reply of ~{tokens:.0f} tokens, "
                  f"SmolLM2-135M Q4_1, {THREADS} threads, {ROUNDS} interleaved rounds x "
                  f"{len(MESSAGES)}")  # fmt: skip
    for column in ("measured at the client", "p50 ms", "p95 ms", "vs Predict p50"):
        table.add_column(column, justify="left" if column.startswith("measured") else "right")
    figures: dict[str, Any] = {"completion_tokens_p50": tokens}
    for name, values in timings.items():
        p50 = statistics.median(values)
        figures[name] = {"p50_ms": p50 * 1000, "p95_ms": percentile(values, 0.95) * 1000,
                         "p50_vs_predict": p50 / predict}  # fmt: skip
        table.add_row(name, f"{p50 * 1000:.0f}", f"{percentile(values, 0.95) * 1000:.0f}",
                      f"{p50 / predict:.3f}x")  # fmt: skip
    console.print(table)
    write_results(
        "predict_stream",
        {"model": "SmolLM2-135M-Instruct Q4_1 (untuned)", "program": "support-reply (str output)",
         "threads": THREADS, "rounds": ROUNDS, "warmup": WARMUP, "max_tokens": MAX_TOKENS,
         "messages": len(MESSAGES)},
        figures,
    )  # fmt: skip


def _measure(client: InferenceClient) -> tuple[dict[str, list[float]], float]:
    timings: dict[str, list[float]] = {"Predict": [], "PredictStream, first delta": [],
                                       "PredictStream, last chunk": []}  # fmt: skip
    tokens: list[int] = []
    for round_index in range(WARMUP + ROUNDS):
        for message in MESSAGES:
            inputs = {"message": message}
            calls = [lambda: _predict(client, inputs), lambda: _stream(client, inputs)]  # noqa: B023
            for call in calls[round_index % 2 :] + calls[: round_index % 2]:
                measured = call()
                if round_index < WARMUP:
                    continue
                for name, seconds in measured.items():
                    if name != "tokens":
                        timings[name].append(seconds)
                    else:
                        tokens.append(int(seconds))
    return timings, statistics.median(tokens)


def _predict(client: InferenceClient, inputs: dict[str, str]) -> dict[str, float]:
    started = time.perf_counter()
    reply = client.predict(inputs, max_tokens=MAX_TOKENS, temperature=0)
    return {"Predict": time.perf_counter() - started, "tokens": reply.usage.completion_tokens}


def _stream(client: InferenceClient, inputs: dict[str, str]) -> dict[str, float]:
    started = time.perf_counter()
    first = None
    for chunk in client.predict_stream(inputs, max_tokens=MAX_TOKENS, temperature=0):
        if first is None and chunk.HasField("delta"):
            first = time.perf_counter() - started
    last = time.perf_counter() - started
    return {"PredictStream, first delta": first or last, "PredictStream, last chunk": last}
