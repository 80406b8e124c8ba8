"""The build host check: the embedded spec's stages through quantize on one device
(`cuda` on a GPU host, `cpu` for the reference), measured, and the exported model's greedy
answers on the dev tickets compared with another device's run of the same seed.

    python -m services.builder.device_check --device cuda --out build/device-check
    python -m services.builder.device_check --device cpu --out build/device-check
    python -m services.builder.device_check --compare A.json B.json

scripts/gpu-check.sh runs the first on a CUDA host; docs/building.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from services.builder.spec import BuildSpec, load_spec

EMBEDDED_SPEC = Path(__file__).resolve().parents[2] / "examples/ticket_triage/spec.yaml"
# Up to and including the quantizations: what a GPU changes, and the Q8_0 a CUDA runtime serves.
THROUGH = "quantize"


def device_spec(spec_path: Path, device: str, out: Path) -> BuildSpec:
    return load_spec(spec_path, device=device, output=str(out / device))


def check(spec: BuildSpec, max_tokens: int = 64) -> dict[str, Any]:
    """Run the stages through THROUGH, then answer every dev row with the F16 export."""
    import torch

    from services.builder.pipeline import log_friendly_console, run_stages
    from services.builder.stages import STAGES

    stages = STAGES[: [s.name for s in STAGES].index(THROUGH) + 1]
    on_gpu = cuda_available()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    ctx, runner = run_stages(spec, log_friendly_console(), stages)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if on_gpu else None
    loss = json.loads((ctx.dirs["finetune"] / "loss.json").read_text())
    self_check = json.loads((ctx.dirs["export"] / "self_check.json").read_text())
    f16 = ctx.dirs["export"] / f"{spec.name}.F16.gguf"
    rows = [*ctx.calibset, *ctx.testset]
    return {
        "device": spec.device,
        "host": host_facts(),
        "ran": runner.ran,
        "skipped": runner.skipped,
        "stages_seconds": round(seconds, 1),
        "finetune": training_figures(loss),
        "peak_gpu_memory_mb": round(peak / 2**20, 1) if peak is not None else None,
        "self_check": self_check_summary(self_check),
        "answers": greedy_answers(f16, ctx, rows, max_tokens, spec.n_threads),
    }


def host_facts() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if cuda_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "gpu": gpu, "cuda": torch.version.cuda}  # fmt: skip


def training_figures(loss: dict[str, Any]) -> dict[str, Any]:
    """What loss.json says about the run: its steps per second include the calibration probes."""
    seconds = loss["seconds"]
    per_second = round(loss["steps"] / seconds, 2) if seconds else None
    return {
        "steps": loss["steps"], "epochs": loss["epochs"], "examples": loss["examples"],
        "seconds": seconds, "steps_per_second": per_second,
        "tokens_per_second": loss["tokens_per_second"], "final_loss": round(loss["final_loss"], 4),
        "chosen_step": loss["chosen_step"],
        "calibration_curve": [(p["step"], p["score"]) for p in loss["calibration_curve"]],
    }  # fmt: skip


def self_check_summary(checks: list[dict[str, Any]]) -> dict[str, Any]:
    worst = max(c["max_logit_difference"] / c["logit_std"] for c in checks)
    # passed: the export stage raises on a failed check, so a finished export passed it
    return {"prompts": len(checks), "worst_logit_difference_sd": round(worst, 4), "passed": True}


def greedy_answers(
    gguf: Path, ctx: Any, rows: list[Any], max_tokens: int, n_threads: int
) -> list[dict[str, Any]]:
    """Each row's outputs as the runtime serves them (greedy, typed decoding), answered as the
    evaluate stage answers a single-predictor program."""
    from services.builder.evaluate import predict_answers
    from services.core.program import PromptCodec
    from services.runtime.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(gguf, n_ctx=4096, n_threads=n_threads)
    answer = predict_answers(backend, PromptCodec(ctx.program_spec), max_tokens)
    answers = []
    for row in rows:
        inputs = {name: row[name] for name in ctx.input_names}
        served, _ = answer(inputs)
        answers.append({"inputs": inputs, "outputs": served["outputs"],
                        "outcome": served["outcome"]})  # fmt: skip
    backend.close()
    return answers


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def agreement(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> dict[str, Any]:
    """How many rows two runs answered alike (every output field equal); rows are matched by
    their inputs, and both runs must have answered the same rows."""
    key = lambda answer: json.dumps(answer["inputs"], sort_keys=True)  # noqa: E731
    theirs = {key(a): a["outputs"] for a in second}
    if sorted(theirs) != sorted(key(a) for a in first):
        raise ValueError("the two runs answered different rows: compare runs of one spec")
    differing = [a["inputs"] for a in first if a["outputs"] != theirs[key(a)]]
    same = len(first) - len(differing)
    return {"n": len(first), "same": same, "share": round(same / len(first), 4) if first else None,
            "differing": differing}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu", "auto"], default="cuda")
    parser.add_argument("--spec", type=Path, default=EMBEDDED_SPEC)
    parser.add_argument("--out", type=Path, default=Path("build/device-check"))
    parser.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("A.json", "B.json"),
        help="print how many dev rows two finished checks answered alike",
    )
    parser.add_argument("--record", type=Path, metavar="RESULT.json",
                        help="with --compare: both runs' figures and the agreement")  # fmt: skip
    args = parser.parse_args(argv)
    if args.compare:
        first, second = (json.loads(p.read_text()) for p in args.compare)
        result = agreement(first["answers"], second["answers"])
        print(json.dumps({k: v for k, v in result.items() if k != "differing"}))
        if args.record:
            runs = [{k: v for k, v in run.items() if k != "answers"} for run in (first, second)]
            args.record.write_text(json.dumps({"runs": runs, "agreement": result}, indent=2))
        return 0
    if args.device == "cuda" and not cuda_available():
        hint = "run it on a GPU host, or DEVICE=cpu make gpu-check for the CPU reference"
        print(f"device_check: torch sees no CUDA device here; {hint}", file=sys.stderr)
        return 2
    spec = device_spec(args.spec, args.device, args.out)
    result = check(spec)
    path = args.out / f"{args.device}.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    shown = {k: v for k, v in result.items() if k != "answers"}
    print(json.dumps(shown, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
