"""Held load: 32 concurrent clients, each a few hundred Predict calls, router -> runtime.

The runtime batches (--parallel 8) behind a bounded queue (--max-queue 16), so admission
control may answer RESOURCE_EXHAUSTED; a client then backs off 50 ms, as a real one should.
Any other error fails the bench. Prints throughput, p50/p99 latency of answered calls, and the
resident memory of both processes after warm-up and at the end (goal: growth at most 10%).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
from rich.console import Console

from bench.results import write_results
from services.core.client import InferenceClient
from services.core.stats import percentile
from testkit.bundles import CAPITALS_PROGRAM
from testkit.processes import ServerProcess, smollm2_gguf, start_runtime

CLIENTS = 32
CALLS_PER_CLIENT = int(os.environ.get("LOAD_CALLS_PER_CLIENT", "200"))
COUNTRIES = ["Italy", "Peru", "Kenya", "Norway", "Chile", "Egypt", "Canada", "Spain", "Japan"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def main() -> None:
    from testkit.bundles import make_bundle
    from testkit.processes import start_router

    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = make_bundle(Path(tmp) / "bundle", smollm2_gguf(), CAPITALS_PROGRAM, threshold=0.0)
        runtime = start_runtime(
            "--bundle", str(bundle), "--n-ctx", "1024", "--parallel", "8", "--max-queue", "16"
        )
        router: ServerProcess | None = None
        try:
            router = start_router(bundle, runtime.target, "--mode", "local_only",
                                  "--threshold", "0.0")  # fmt: skip
            report = run_load(router.target, runtime, router)
        finally:
            if router is not None:
                router.terminate()
            runtime.terminate()
    codes, latencies, wall, memory = report
    answered = codes[grpc.StatusCode.OK]
    console.print(
        f"Load: {CLIENTS} clients x {CALLS_PER_CLIENT} Predict calls through the router to a "
        f"batched runtime (SmolLM2-135M, 2 threads) in {wall:.0f} s"
    )
    console.print("  outcomes: " + ", ".join(f"{c.name} {n}" for c, n in codes.items()))
    console.print(
        f"  answered {answered / wall:.1f} calls/s; latency p50 "
        f"{statistics.median(latencies) * 1000:.0f} ms, p99 "
        f"{percentile(latencies, 0.99) * 1000:.0f} ms"
    )
    allowed = (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)
    other = {c: n for c, n in codes.items() if c not in allowed}
    for name, (start, end) in memory.items():
        growth = (end - start) / start
        console.print(
            f"  {name} resident memory {start:.0f} -> {end:.0f} MB ({growth:+.1%}; goal <= +10%: "
            f"{'met' if growth <= 0.10 else 'missed'})"
        )
    console.print(
        f"  errors other than RESOURCE_EXHAUSTED: {sum(other.values())} "
        f"({'met' if not other else 'MISSED'}: goal 0)"
    )
    write_results(
        "load",
        {"clients": CLIENTS, "calls_per_client": CALLS_PER_CLIENT, "parallel": 8,
         "max_queue": 16, "model": "SmolLM2-135M-Instruct Q4_1", "threads": 2},
        {"wall_s": wall, "outcomes": {c.name: n for c, n in codes.items()},
         "answered_per_s": answered / wall,
         "latency_p50_ms": statistics.median(latencies) * 1000 if latencies else None,
         "latency_p99_ms": percentile(latencies, 0.99) * 1000,
         "resident_mb": {name: {"start": start, "end": end}
                         for name, (start, end) in memory.items()}},
    )  # fmt: skip


def run_load(
    target: str, runtime: ServerProcess, router: ServerProcess
) -> tuple[Counter[grpc.StatusCode], list[float], float, dict[str, tuple[float, float]]]:
    codes: Counter[grpc.StatusCode] = Counter()
    latencies: list[float] = []
    lock = threading.Lock()

    def client_loop(index: int, calls: int) -> None:
        with InferenceClient(target, timeout_s=120) as client:
            for call in range(calls):
                country = COUNTRIES[(index + call) % len(COUNTRIES)]
                started = time.perf_counter()
                try:
                    client.predict({"country": country}, max_tokens=16)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as err:
                    code = err.code()
                elapsed = time.perf_counter() - started
                with lock:
                    codes[code] += 1
                    if code == grpc.StatusCode.OK:
                        latencies.append(elapsed)
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    time.sleep(0.05)

    def run(calls: int) -> float:
        threads = [threading.Thread(target=client_loop, args=(i, calls)) for i in range(CLIENTS)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - started

    run(3)  # warm-up: caches, arenas and thread pools reach their working size
    codes.clear()
    latencies.clear()
    pids = {"runtime": runtime.proc.pid, "router": router.proc.pid}
    before = {name: rss_mb(pid) for name, pid in pids.items()}
    wall = run(CALLS_PER_CLIENT)
    after = {name: rss_mb(pid) for name, pid in pids.items()}
    return codes, latencies, wall, {n: (before[n], after[n]) for n in pids}


if __name__ == "__main__":
    main()
