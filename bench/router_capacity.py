"""Router capacity: what one router adds per Predict and how many calls per second it routes,
in front of STAND-IN runtimes that answer at once (testkit/instant_runtime.py: no model), so
the router is all that is measured; beside it, a real runtime's Predict throughput on the same
host, and from the two, how many runtime replicas one router replica can front.

Side by side in one run, the same client (grpc.aio, one process), Predict on the capitals
program:
  (a) client -> instant runtime              the wire and the client alone
  (b) client -> router -> 3 instant runtimes  (a) plus the router (local_only, gRPC round_robin)
  (c) client -> real runtime                  SmolLM2-135M Q4_1, 2 threads, --parallel 1
at concurrency 1 (latency: p50, p95) and 16 (calls per second). Everything shares this
machine's cores, the load generator included, so (b)'s calls per second is a lower bound on
a router with a core of its own.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc.aio
from rich.console import Console
from rich.table import Table

from bench.results import write_results
from services.core.api import pb, pb_grpc
from services.core.stats import percentile
from testkit.bundles import CAPITALS_PROGRAM, make_bundle
from testkit.processes import REPO, free_port, smollm2_gguf, start_router, start_runtime

LATENCY_CALLS = 300
THROUGHPUT_S = 6.0
CONCURRENCY = 16
INSTANT_RUNTIMES = 3


async def measure(target: str, concurrency: int, *, calls: int = 0, seconds: float = 0) -> Any:
    """Latencies of `calls` calls (or as many as fit in `seconds`) from `concurrency` tasks."""
    request = pb.PredictRequest(
        inputs={"country": "Peru"}, options=pb.SamplingOptions(max_tokens=16)
    )
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        await stub.Predict(request, timeout=60)  # connect, warm
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()

        async def worker() -> None:
            while (len(latencies) < calls) if calls else (time.perf_counter() < deadline):
                begun = time.perf_counter()
                await stub.Predict(request, timeout=60)
                latencies.append(time.perf_counter() - begun)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {
        "calls": len(latencies),
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": percentile(latencies, 0.95) * 1000,
        "calls_per_s": len(latencies) / wall,
    }


def system(target: str, real: bool) -> dict[str, Any]:
    serial = asyncio.run(measure(target, 1, calls=20 if real else LATENCY_CALLS))
    loaded = asyncio.run(measure(target, CONCURRENCY, seconds=THROUGHPUT_S))
    return {"concurrency_1": serial, f"concurrency_{CONCURRENCY}": loaded}


def instant_runtimes(program: Path) -> list[tuple[subprocess.Popen[bytes], str]]:
    started = []
    for _ in range(INSTANT_RUNTIMES):
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "testkit.instant_runtime", "--port", str(port),
             "--program", str(program)], cwd=REPO,
        )  # fmt: skip
        started.append((proc, f"127.0.0.1:{port}"))
    for _, target in started:
        asyncio.run(wait_ready(target))
    return started


async def wait_ready(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)


def main() -> None:
    console = Console()
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = make_bundle(Path(tmp) / "bundle", smollm2_gguf(), CAPITALS_PROGRAM)
        standins = instant_runtimes(bundle / "program" / "program.json")
        try:
            figures["direct_instant"] = system(standins[0][1], real=False)
            local = "ipv4:" + ",".join(target for _, target in standins)
            router = start_router(bundle, local, "--mode", "local_only")
            try:
                figures["router_instant"] = system(router.target, real=False)
            finally:
                router.terminate()
        finally:
            for proc, _ in standins:
                proc.terminate()
                proc.wait(10)
        runtime = start_runtime("--bundle", str(bundle), "--n-ctx", "1024", "--parallel", "1")
        try:
            figures["real_runtime"] = system(runtime.target, real=True)
        finally:
            runtime.terminate()
    loaded = f"concurrency_{CONCURRENCY}"
    added = figures["router_instant"]["concurrency_1"]["p50_ms"] - figures["direct_instant"][
        "concurrency_1"]["p50_ms"]  # fmt: skip
    router_rate = figures["router_instant"][loaded]["calls_per_s"]
    runtime_rate = figures["real_runtime"][loaded]["calls_per_s"]
    figures["router_adds_p50_ms"] = added
    figures["replicas_per_router"] = router_rate / runtime_rate
    print_table(console, figures)
    console.print(
        f"The router adds {added:.2f} ms per call (p50) and routes {router_rate:.0f} calls/s "
        f"sharing 2 cores with its load; one real runtime replica answers {runtime_rate:.1f} "
        f"calls/s: one router replica fronts about {router_rate / runtime_rate:.0f} runtime "
        "replicas of this size before the router is the bottleneck."
    )
    write_results(
        "router_capacity",
        {"program": "capitals", "instant_runtimes": INSTANT_RUNTIMES, "concurrency": CONCURRENCY,
         "latency_calls": LATENCY_CALLS, "throughput_s": THROUGHPUT_S,
         "real_runtime": "SmolLM2-135M-Instruct Q4_1, 2 threads, --parallel 1",
         "instant_runtime": "testkit/instant_runtime.py (stand-in: answers without a model)"},
        figures,
    )  # fmt: skip


def print_table(console: Console, figures: dict[str, Any]) -> None:
    table = Table(title="Router capacity (Predict, capitals program)")
    for column in ("system", "p50 ms (c=1)", "p95 ms (c=1)", f"calls/s (c={CONCURRENCY})"):
        table.add_column(column, justify="right" if column != "system" else "left")
    names = {"direct_instant": "client -> instant runtime (stand-in)",
             "router_instant": "client -> router -> 3 instant runtimes",
             "real_runtime": "client -> real runtime (SmolLM2)"}  # fmt: skip
    for key, label in names.items():
        serial, loaded = figures[key]["concurrency_1"], figures[key][f"concurrency_{CONCURRENCY}"]
        table.add_row(label, f"{serial['p50_ms']:.2f}", f"{serial['p95_ms']:.2f}",
                      f"{loaded['calls_per_s']:.1f}")  # fmt: skip
    console.print(table)


if __name__ == "__main__":
    main()
