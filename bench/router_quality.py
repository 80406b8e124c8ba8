"""What the router buys: quality and API calls of local-only, hybrid and API-only, side by side.

On the ticket-triage dev set with the distilled bundle from `make build-bundle`. No strong model
runs on this machine, so the API is an OpenAI-compatible loopback STAND-IN that answers with
the dev set's gold labels (tests/openai_standin.py): a stand-in for a strong teacher. The
measure is therefore one of calibration: how much of the gap to the teacher the router
recovers per API call. The threshold is the bundle's, chosen by the build on the calibration
part of the dev set; it is measured here on the test part, whose problems (groups) calibration
never saw: the build's own split, recomputed from the spec.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.held_out import build_context
from bench.results import write_results
from services.core.api import pb
from services.core.client import InferenceClient
from services.core.stats import wilson_interval
from testkit.openai_standin import OpenAIStandIn
from testkit.processes import REPO, ServerProcess, start_runtime

BUNDLE = REPO / "build" / "ticket-triage" / "bundle"
SPEC = REPO / "examples" / "ticket_triage" / "spec.yaml"


def _router(bundle: Path, local: str, *args: str) -> ServerProcess:
    server = ServerProcess(
        ["route", "--bundle", str(bundle), "--local", local, "--port", "0",
         "--metrics-port", "0", *args]
    )  # fmt: skip
    server.wait_serving(30)
    return server


def main() -> None:
    console = Console()
    if not (BUNDLE / "manifest.json").is_file():
        console.print(f"[yellow]router bench: no bundle at {BUNDLE}; run `make build-bundle`[/]")
        sys.exit(2)
    context = build_context(SPEC)
    calibset, testset = context.calibset, context.testset
    calibration = json.loads((BUNDLE / "calibration.json").read_text())
    threshold = calibration["threshold"]
    held_out_rows = [{"ticket": e.ticket, "category": e.category} for e in testset]
    gold = {e.ticket.strip(): e.category for e in calibset + testset}

    runtime = start_runtime("--bundle", str(BUNDLE), "--n-ctx", "2048")
    results: dict[str, dict[str, float]] = {}
    try:
        with OpenAIStandIn(gold) as api:
            fallback = [
                "--fallback-model",
                "openai/gold-teacher",
                "--fallback-api-base",
                api.base_url,
            ]
            configurations = {
                "local-only": ["--mode", "local_only"],
                f"hybrid (threshold {threshold:.3f}, logprob)": [
                    "--mode", "hybrid", "--threshold", str(threshold), *fallback],
                "hybrid (self-check, the seed's mode)": [
                    "--mode", "hybrid", "--confidence", "self_check", "--threshold", "0.5",
                    *fallback],
                "API-only (gold stand-in)": ["--mode", "api_only", *fallback],
            }  # fmt: skip
            for name, args in configurations.items():
                router = _router(BUNDLE, runtime.target, *args)
                correct, fell_back, latencies = 0, 0, []
                try:
                    with InferenceClient(router.target, timeout_s=120) as client:
                        for row in held_out_rows:
                            started = time.perf_counter()
                            reply = client.predict({"ticket": row["ticket"]})
                            latencies.append(time.perf_counter() - started)
                            correct += reply.outputs.get("category", "") == row["category"]
                            fell_back += reply.served_by == pb.SERVED_BY_FALLBACK
                finally:
                    router.terminate()
                low, high = wilson_interval(correct, len(held_out_rows))
                results[name] = {
                    "n": len(held_out_rows),
                    "quality": correct / len(held_out_rows),
                    "quality_low": low,
                    "quality_high": high,
                    "fallback_rate": fell_back / len(held_out_rows),
                    "p50_ms": statistics.median(latencies) * 1000,
                }
    finally:
        runtime.terminate()

    api_quality = results["API-only (gold stand-in)"]["quality"]
    local_quality = results["local-only"]["quality"]
    table = Table(title=f"Router on the test part ({len(held_out_rows)} ticket-triage dev rows; "
                        f"threshold chosen on the calibration part, {len(calibset)} rows of "
                        "other problems)")  # fmt: skip
    for column in (
        "configuration",
        "quality [95% CI]",
        "API calls",
        "vs API-only",
        "gap recovered",
        "p50 ms",
    ):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for name, r in results.items():
        gap = api_quality - local_quality
        recovered = (r["quality"] - local_quality) / gap if gap > 0 else 1.0
        table.add_row(
            name, f"{r['quality']:.1%} [{r['quality_low']:.1%}, {r['quality_high']:.1%}]",
            f"{r['fallback_rate']:.1%}",
            f"{r['quality'] / api_quality:.3f}x" if api_quality else "-",
            f"{recovered:.0%}", f"{r['p50_ms']:.0f}",
        )  # fmt: skip
    console.print(table)
    hybrid = next(v for k, v in results.items() if k.startswith("hybrid (threshold"))
    ratio = hybrid["quality"] / api_quality if api_quality else 0.0
    ok = ratio >= 0.95 and hybrid["fallback_rate"] <= 0.20
    console.print(
        f"hybrid reaches {ratio:.1%} of API-only quality with {hybrid['fallback_rate']:.1%} of "
        f"calls sent to the API ({'meets' if ok else 'misses'} the goal: >=95% with <=20%)"
    )
    write_results(
        "router",
        {"bundle": str(BUNDLE.relative_to(REPO)), "calibration_examples": len(calibset),
         "test_examples": len(held_out_rows),
         "split": "the build's: dev rows split by problem group (no group on both sides)",
         "calibration_on_build": calibration["calibration"],
         "threshold": threshold, "api": "OpenAI-compatible stand-in answering gold labels"},
        {"configurations": results, "hybrid_vs_api_only": ratio, "goal_met": ok},
    )  # fmt: skip
