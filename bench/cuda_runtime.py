"""The runtime on a CUDA build of llama.cpp (issue 15): the batching bench's chat and predict
workloads against the gRPC runtime with every layer on the GPU, at concurrency 1, 8, 16 and
64 (`--parallel 64`), and one stream's decode speed against the GPU's memory-bandwidth
roofline. Needs llama-cpp-python built with CUDA (docs/building.md, "A CUDA runtime");
`python -m bench cuda` with BENCH_GGUF=the distilled Q8_0. The CPU figures to set it against
are bench/results/batching.json's.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from bench.batching import (
    bench_runtime,
    decode_tokens_per_s,
    model_bytes_per_token,
    shipped_type_gguf,
    workloads,
)
from bench.results import write_results

LEVELS = tuple(int(n) for n in os.environ.get("BENCH_LEVELS", "1,8,16,64").split(","))
# The H200's HBM3e bandwidth by its datasheet (4.8 TB/s); a copy moves ~4.3 TB/s there.
BANDWIDTH_GB_S = float(os.environ.get("BENCH_GPU_BANDWIDTH_GB_S", "4800"))


def main() -> None:
    console = Console()
    gguf = Path(os.environ["BENCH_GGUF"]) if "BENCH_GGUF" in os.environ else shipped_type_gguf()
    codec, loads = workloads(LEVELS)
    program = Path(tempfile.mkdtemp()) / "program.json"
    program.write_text(codec.spec.model_dump_json())
    results = bench_runtime(gguf, program, max(LEVELS), loads, LEVELS, n_gpu_layers=-1)
    for load in loads:
        for level in results[load.name]:
            console.print(
                f"{load.name} c={level.concurrency}: {level.tokens_per_s:.0f} tokens/s, "
                f"{level.calls_per_s:.1f} calls/s, p50 {level.p50_s * 1000:.0f} ms, "
                f"p95 {level.p95_s * 1000:.0f} ms"
            )
    single = decode_tokens_per_s(gguf, n_gpu_layers=-1)
    per_token = model_bytes_per_token(gguf)
    roofline = BANDWIDTH_GB_S * 1e9 / per_token
    console.print(
        f"single-stream decode {single:.0f} tokens/s; {per_token / 1e6:.1f} MB of weights per "
        f"token at {BANDWIDTH_GB_S:.0f} GB/s -> at most {roofline:.0f} tokens/s: "
        f"{single / roofline:.1%} of the roofline"
    )
    write_results(
        "cuda_runtime",
        {"gguf": gguf.name, "parallel": max(LEVELS), "n_gpu_layers": -1,
         "max_tokens": {load.name: load.max_tokens for load in loads}},
        {"runtime": {name: [asdict(level) for level in levels] for name, levels in results.items()},
         "roofline": {"bandwidth_gb_s": BANDWIDTH_GB_S, "weights_mb_per_token": per_token / 1e6,
                      "bound_tokens_per_s": roofline, "decode_tokens_per_s": single,
                      "fraction": single / roofline}},
    )  # fmt: skip


if __name__ == "__main__":
    main()
