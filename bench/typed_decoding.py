"""Predict at the machine's limit: the prefix-first prompt format and typed decoding against
the format and decoding before them, on the same distilled ticket-triage recipe.

Side by side in one run, the same host, each runtime alone on the cores, both bundles' Q8_0:
  before   build/ticket-triage-chat/bundle: DSPy's ChatAdapter as is (`edgedistill build
           examples/ticket_triage/spec.yaml --prompt-format chat --output
           build/ticket-triage-chat`), served with --no-typed-decoding: the model samples the
           whole answer, scaffold included
  after    build/ticket-triage/bundle (`make build-bundle`: prefix-first), served as shipped
           (typed decoding: the scaffold forced, the label chosen among the six)
Measured per system on the ticket-triage dev set (120 rows: the build's calibration and test
parts): Predict latency p50/p95 at concurrency 1 (--parallel 1, the default), calls per second
at concurrency 8 (--parallel 8), decode steps per call, UNPARSED answers, accuracy; in-process,
the time to the first sampled token with the program prefix warm vs cold. Then the router:
the same new model's confidence without typed decoding (the geometric-mean probability of the
label's tokens) and with it (the label's probability among the allowed labels), each
calibrated on the calibration part to the build's target and to stricter ones, measured on the
test part (calls sent to the API, system quality with the gold teacher).
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.held_out import build_context
from bench.results import write_results
from bench.router_confidence import ROUTER_TARGETS, router_calibration, router_table
from services.core.api import pb
from services.core.client import InferenceClient
from services.core.stats import percentile, wilson_interval
from testkit.processes import REPO, start_runtime

SPEC = REPO / "examples" / "ticket_triage" / "spec.yaml"
BEFORE = REPO / "build" / "ticket-triage-chat" / "bundle"
AFTER = REPO / "build" / "ticket-triage" / "bundle"
VARIANT = "Q8_0"
CONCURRENCY = 8
CALLS_AT_CONCURRENCY = 64
TTFT_PROMPTS = 24


@dataclass
class Answer:
    split: str
    label: str
    outcome: str
    category: str
    confidence: float
    latency_s: float
    decode_steps: int
    completion_tokens: int

    @property
    def score(self) -> float:
        return float(self.outcome == "parsed" and self.category == self.label)


def dev_rows() -> list[tuple[str, str, str]]:
    """(split, ticket, label) of the build's calibration and test parts, in its order."""
    context = build_context(SPEC)
    calibset, testset = context.calibset, context.testset
    return [("calibration", e.ticket, e.category) for e in calibset] + [
        ("test", e.ticket, e.category) for e in testset
    ]


def serial(bundle: Path, rows: list[tuple[str, str, str]], *flags: str) -> list[Answer]:
    """Every row once, one call at a time, on a --parallel 1 runtime."""
    server = start_runtime("--bundle", str(bundle), "--variant", VARIANT, "--n-ctx", "1024",
                           "--parallel", "1", *flags)  # fmt: skip
    try:
        with InferenceClient(server.target, timeout_s=120) as client:
            client.predict({"ticket": rows[0][1]})  # warm-up: the prefix is evaluated once
            return [_answer(client, split, ticket, label) for split, ticket, label in rows]
    finally:
        server.terminate()


def _answer(client: InferenceClient, split: str, ticket: str, label: str) -> Answer:
    started = time.perf_counter()
    reply = client.predict({"ticket": ticket})
    elapsed = time.perf_counter() - started
    outcome = pb.PredictOutcome.Name(reply.outcome).removeprefix("PREDICT_OUTCOME_").lower()
    usage = reply.usage
    return Answer(
        split=split, label=label, outcome=outcome, category=reply.outputs.get("category", ""),
        confidence=reply.confidence, latency_s=elapsed,
        decode_steps=usage.decode_steps or usage.completion_tokens,
        completion_tokens=usage.completion_tokens,
    )  # fmt: skip


def calls_per_second(bundle: Path, tickets: list[str], *flags: str) -> float:
    """CONCURRENCY clients at once on a --parallel CONCURRENCY runtime."""
    server = start_runtime("--bundle", str(bundle), "--variant", VARIANT, "--n-ctx", "1024",
                           "--parallel", str(CONCURRENCY), *flags)  # fmt: skip
    try:
        with InferenceClient(server.target, timeout_s=300) as client:
            client.predict({"ticket": tickets[0]})
            started = time.perf_counter()
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                list(pool.map(lambda t: client.predict({"ticket": t}), tickets))
            return len(tickets) / (time.perf_counter() - started)
    finally:
        server.terminate()


def first_sampled_token(bundle: Path, tickets: list[str], *, typed: bool) -> dict[str, float]:
    """In-process: median time from a Predict's start to its first sampled token, with nothing
    cached (cold) and with the program prefix warm."""
    from services.core.bundle import Bundle
    from services.core.program import PromptCodec, program_from_file
    from services.runtime.backends import TokenPiece
    from services.runtime.backends.base import program_prefix
    from services.runtime.backends.llamacpp_batched import BatchedLlamaCpp
    from services.runtime.predict import predict_params, prepare_answer

    opened = Bundle.open(bundle)
    codec = PromptCodec(program_from_file(opened.program_path))
    engine = BatchedLlamaCpp(opened.model_path(VARIANT), n_ctx=1024, n_threads=2, parallel=1)
    params = predict_params(64, seed=0)

    def first(ticket: str) -> float:
        engine.clear_cache()  # nothing reused from the previous call but the warm prefix
        prompt = prepare_answer(engine, codec, codec.format_messages({"ticket": ticket}),
                                typed=typed)  # fmt: skip
        started = time.perf_counter()
        for event in engine.generate(prompt, params, lambda: False):
            if isinstance(event, TokenPiece) and event.logprob is not None:
                break
        return time.perf_counter() - started

    try:
        first(tickets[0])
        cold = statistics.median(first(t) for t in tickets)
        engine.warm_prefix(program_prefix(engine, codec))
        warm = statistics.median(first(t) for t in tickets)
        return {"cold_s": cold, "warm_s": warm, "prefix_tokens": engine.prefix_tokens}
    finally:
        engine.close()


def summary(answers: list[Answer]) -> dict[str, Any]:
    latencies = [a.latency_s for a in answers]
    test = [a for a in answers if a.split == "test"]
    correct = sum(a.score for a in test)
    return {
        "n": len(answers),
        "p50_s": percentile(latencies, 0.5),
        "p95_s": percentile(latencies, 0.95),
        "decode_steps_per_call": statistics.mean(a.decode_steps for a in answers),
        "completion_tokens_per_call": statistics.mean(a.completion_tokens for a in answers),
        "unparsed": sum(a.outcome != "parsed" for a in answers),
        "test_n": len(test),
        "test_accuracy": correct / len(test),
        "test_interval": wilson_interval(int(correct), len(test)),
    }


def main() -> None:
    console = Console()
    missing = [b for b in (BEFORE, AFTER) if not (b / "manifest.json").is_file()]
    if missing:
        console.print(
            f"[yellow]typed-decoding bench: no bundle at {', '.join(map(str, missing))}; run "
            "`make build-bundle` and `edgedistill build examples/ticket_triage/spec.yaml "
            "--prompt-format chat --output build/ticket-triage-chat`[/]"
        )
        return
    rows = dev_rows()
    tickets = [ticket for _, ticket, _ in rows]
    load = tickets[:CALLS_AT_CONCURRENCY]
    runs = {
        "before": (BEFORE, ("--no-typed-decoding",), False),
        "after": (AFTER, (), True),
    }
    results: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[Answer]] = {}
    for name, (bundle, flags, typed) in runs.items():
        console.print(f"running {name} ...")
        answers[name] = serial(bundle, rows, *flags)
        results[name] = {
            **summary(answers[name]),
            "calls_per_s_at_8": calls_per_second(bundle, load, *flags),
            "first_token": first_sampled_token(bundle, tickets[:TTFT_PROMPTS], typed=typed),
        }
    console.print("running the new model without typed decoding (today's confidence) ...")
    free_after = serial(AFTER, rows, "--no-typed-decoding")
    router = {
        "before": [router_calibration(list(free_after), t, VARIANT) for t in ROUTER_TARGETS],
        "after": [router_calibration(list(answers["after"]), t, VARIANT) for t in ROUTER_TARGETS],
    }
    print_results(console, results, router)
    write_results(
        "typed_decoding",
        {"before": str(BEFORE.relative_to(REPO)), "after": str(AFTER.relative_to(REPO)),
         "variant": VARIANT, "rows": len(rows), "concurrency": CONCURRENCY,
         "calls_at_concurrency": len(load)},
        {"systems": results, "ratios": ratios(results), "router": router,
         "answers": {name: [asdict(a) for a in found] for name, found in answers.items()}},
    )  # fmt: skip


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    before, after = results["before"], results["after"]
    return {
        "p50": after["p50_s"] / before["p50_s"],
        "p95": after["p95_s"] / before["p95_s"],
        "calls_per_s_at_8": after["calls_per_s_at_8"] / before["calls_per_s_at_8"],
        "warm_vs_cold_first_token": after["first_token"]["warm_s"] / after["first_token"]["cold_s"],
        "decode_steps": after["decode_steps_per_call"] / before["decode_steps_per_call"],
    }


def print_results(
    console: Console, results: dict[str, dict[str, Any]], router: dict[str, list[dict[str, Any]]]
) -> None:
    table = Table(title=f"Predict, ticket-triage {VARIANT}, {results['after']['n']} dev rows")
    for column in ("", "before", "after", "after / before", "goal"):
        table.add_column(column)
    before, after = results["before"], results["after"]
    ratio = ratios(results)
    goals = {"p50": "<= 0.35", "calls_per_s_at_8": ">= 2.5", "warm_vs_cold_first_token": "<= 0.15"}
    table.add_row(
        "p50 ms (concurrency 1)",
        f"{before['p50_s'] * 1000:.0f}",
        f"{after['p50_s'] * 1000:.0f}",
        f"{ratio['p50']:.2f}x",
        goals["p50"],
    )
    table.add_row(
        "p95 ms (concurrency 1)",
        f"{before['p95_s'] * 1000:.0f}",
        f"{after['p95_s'] * 1000:.0f}",
        f"{ratio['p95']:.2f}x",
        "",
    )
    table.add_row(
        f"calls/s (concurrency {CONCURRENCY})",
        f"{before['calls_per_s_at_8']:.1f}",
        f"{after['calls_per_s_at_8']:.1f}",
        f"{ratio['calls_per_s_at_8']:.2f}x",
        goals["calls_per_s_at_8"],
    )
    table.add_row(
        "decode steps per call",
        f"{before['decode_steps_per_call']:.1f}",
        f"{after['decode_steps_per_call']:.1f}",
        f"{ratio['decode_steps']:.2f}x",
        "<= 4",
    )
    for name, label in (("cold_s", "first token, cold ms"), ("warm_s", "first token, warm ms")):
        table.add_row(
            label,
            f"{before['first_token'][name] * 1000:.0f}",
            f"{after['first_token'][name] * 1000:.0f}",
            "",
            "",
        )
    table.add_row(
        "first token warm / cold",
        f"{before['first_token']['warm_s'] / before['first_token']['cold_s']:.2f}x",
        f"{ratio['warm_vs_cold_first_token']:.2f}x",
        "",
        goals["warm_vs_cold_first_token"],
    )
    table.add_row("UNPARSED (all rows)", str(before["unparsed"]), str(after["unparsed"]), "", "0")
    table.add_row(f"accuracy, test part (n={after['test_n']})", _accuracy(before),
                  _accuracy(after), "", "within before's interval")  # fmt: skip
    console.print(table)
    console.print(router_table(router, f"Router on the new model, ticket-triage {VARIANT}"))


def _accuracy(result: dict[str, Any]) -> str:
    lo, hi = result["test_interval"]
    return f"{result['test_accuracy']:.1%} [{lo:.1%}-{hi:.1%}]"
