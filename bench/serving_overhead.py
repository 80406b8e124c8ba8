"""What serving costs: a 32-token greedy generation in-process vs through the runtime.

Side by side in one run, interleaved call by call (each round in a rotated order), same GGUF,
same prompt, same settings:
  in-process   llama_cpp.Llama.create_chat_completion (what a Python user would write)
  gRPC         Generate (streamed) and Predict (DSPy-formatted) on a loopback runtime
  HTTP         the same runtime's HTTP API: a chat completion, Ollama's /api/chat and
               /v1/predict (kept-alive)
Each served path is compared with the in-process call on exactly the same prompt.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.results import write_results
from services.core.api import pb
from services.core.client import InferenceClient
from services.core.program import COMPLETED_MARKER, ProgramSpec, PromptCodec
from services.core.stats import percentile
from testkit.bundles import CAPITALS_PROGRAM
from testkit.processes import free_port, smollm2_gguf, start_runtime

MAX_TOKENS = 32
THREADS = 2
ROUNDS = 25
WARMUP = 3
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
OTHER = [{"role": "user", "content": "Quick: what is two plus two?"}]


def main() -> None:
    import httpx
    from llama_cpp import Llama

    console = Console()
    gguf = smollm2_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        program_path = Path(tmp) / "program.json"
        program_path.write_text(json.dumps(CAPITALS_PROGRAM))
        codec = PromptCodec(ProgramSpec.load(program_path))
        predict_inputs = {"country": "Germany"}
        predict_messages = codec.format_messages(predict_inputs)

        http_port = free_port()
        server = start_runtime(
            "--model", str(gguf), "--program", str(program_path), "--n-ctx", "2048",
            "--http-port", str(http_port), env={"EDGEDISTILL_N_THREADS": str(THREADS)},
        )  # fmt: skip
        llm = Llama(
            str(gguf), n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS, verbose=False
        )
        tokens: dict[str, int] = {}
        try:
            client = InferenceClient(server.target)
            http = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60)
            name = http.get("/api/tags").json()["models"][0]["name"]
            greedy = {"max_tokens": MAX_TOKENS, "temperature": 0}

            def ip_gen() -> int:
                messages: Any = STORY
                out = llm.create_chat_completion(messages, max_tokens=MAX_TOKENS, temperature=0)
                return int(out["usage"]["completion_tokens"])  # type: ignore[index]

            def grpc_gen() -> int:
                turns = [(m["role"], m["content"]) for m in STORY]
                *_, last = client.generate(turns, max_tokens=MAX_TOKENS, temperature=0)
                return int(last.usage.completion_tokens)

            def http_gen() -> int:
                chat = http.post("/v1/chat/completions", json={"messages": STORY, **greedy})
                return int(chat.json()["usage"]["completion_tokens"])

            def ollama_gen() -> int:
                options = {"num_predict": MAX_TOKENS, "temperature": 0}
                body = {"model": name, "messages": STORY, "stream": False, "options": options}
                return int(http.post("/api/chat", json=body).json()["eval_count"])

            def ip_pred() -> int:
                out = llm.create_chat_completion(
                    predict_messages,  # type: ignore[arg-type]
                    stop=[COMPLETED_MARKER],
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                )
                return int(out["usage"]["completion_tokens"])  # type: ignore[index]

            def grpc_pred() -> int:
                reply = client.predict(predict_inputs, max_tokens=MAX_TOKENS, temperature=0)
                assert reply.outcome == pb.PREDICT_OUTCOME_PARSED
                return int(reply.usage.completion_tokens)

            def http_pred() -> int:
                body = {"inputs": predict_inputs, "options": greedy}
                answer = http.post("/v1/predict", json=body).json()
                assert answer["outcome"] == "PREDICT_OUTCOME_PARSED", answer
                return int(answer["usage"]["completion_tokens"])

            def flush_in_process() -> None:
                messages: Any = OTHER
                llm.create_chat_completion(messages, max_tokens=1, temperature=0)

            def flush_runtime() -> None:
                list(client.generate([(m["role"], m["content"]) for m in OTHER], max_tokens=1))

            calls = {"ip_gen": ip_gen, "grpc_gen": grpc_gen, "http_gen": http_gen,
                     "ollama_gen": ollama_gen, "ip_pred": ip_pred, "grpc_pred": grpc_pred,
                     "http_pred": http_pred}  # fmt: skip
            timings: dict[str, list[float]] = {key: [] for key in calls}
            order = list(calls)
            for round_index in range(WARMUP + ROUNDS):
                # Each round starts one path later, so that no path always follows another.
                shift = round_index % len(order)
                for key in order[shift:] + order[:shift]:
                    # Every call starts with another prompt in its engine's KV cache: a path
                    # right after one with the same prompt would reuse all of it. (The
                    # runtime's program prefix stays cached whatever ran: that is served.)
                    flush_in_process() if key.startswith("ip_") else flush_runtime()
                    started = time.perf_counter()
                    tokens[key] = calls[key]()
                    if round_index >= WARMUP:
                        timings[key].append(time.perf_counter() - started)
            client.close()
            http.close()
        finally:
            server.terminate()
            llm.close()

    table = Table(title=f"Serving overhead: greedy, max_tokens={MAX_TOKENS}, {THREADS} threads, "
                  f"{ROUNDS} interleaved rounds, SmolLM2-135M Q4_1")  # fmt: skip
    for column in ("path", "tokens", "p50 ms", "p95 ms", "p50 vs in-process"):
        table.add_column(column, justify="right" if column != "path" else "left")
    rows = [
        ("in-process chat (story prompt)", "ip_gen", None),
        ("gRPC Generate (same prompt)", "grpc_gen", "ip_gen"),
        ("HTTP chat completion (same prompt)", "http_gen", "ip_gen"),
        ("HTTP Ollama /api/chat (same prompt)", "ollama_gen", "ip_gen"),
        ("in-process chat (DSPy prompt)", "ip_pred", None),
        ("gRPC Predict (same prompt)", "grpc_pred", "ip_pred"),
        ("HTTP /v1/predict (same prompt)", "http_pred", "ip_pred"),
    ]
    summary = {}
    for label, key, base in rows:
        p50 = statistics.median(timings[key]) * 1000
        ratio = ""
        if base:
            ratio_value = statistics.median(timings[key]) / statistics.median(timings[base])
            summary[key] = ratio_value
            ratio = f"{ratio_value:.3f}x"
        table.add_row(
            label,
            str(tokens[key]),
            f"{p50:.1f}",
            f"{percentile(timings[key], 0.95) * 1000:.1f}",
            ratio,
        )
    console.print(table)
    for key, name in (("grpc_gen", "gRPC Generate"), ("grpc_pred", "gRPC Predict"),
                      ("http_gen", "HTTP chat completion"), ("ollama_gen", "Ollama /api/chat"),
                      ("http_pred", "HTTP /v1/predict")):  # fmt: skip
        overhead = (summary[key] - 1) * 100
        verdict = "meets" if overhead <= 5 else "misses"
        console.print(f"{name} adds {overhead:+.1f}% at p50 ({verdict} the goal of at most 5%)")
    if (
        len({tokens[k] for k in ("ip_gen", "grpc_gen", "http_gen", "ollama_gen")}) > 1
        or len({tokens[k] for k in ("ip_pred", "grpc_pred", "http_pred")}) > 1
    ):
        console.print("[yellow]warning: token counts differ between paths[/]")
    write_results(
        "serving",
        {"model": "SmolLM2-135M-Instruct Q4_1", "threads": THREADS, "max_tokens": MAX_TOKENS,
         "rounds": ROUNDS, "warmup": WARMUP},
        {
            "paths": {
                key: {"label": label, "tokens": tokens[key],
                      "p50_ms": statistics.median(timings[key]) * 1000,
                      "p95_ms": percentile(timings[key], 0.95) * 1000}
                for label, key, _ in rows
            },
            "p50_ratio_grpc_vs_in_process": {"Generate": summary["grpc_gen"],
                                             "Predict": summary["grpc_pred"]},
            "p50_ratio_http_vs_in_process": {"chat completion": summary["http_gen"],
                                             "ollama chat": summary["ollama_gen"],
                                             "predict": summary["http_pred"]},
        },
    )  # fmt: skip
