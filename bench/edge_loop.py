"""The edge loop, end to end: harvest the hard cases, retrain on them, fall back less.

1. `before`: ticket triage distilled from a small start (BEFORE_ROWS train rows, the default
   recipe), its router threshold calibrated by the build.
2. It serves in hybrid mode: a real runtime and a real router with `--harvest` on loopback.
   The API is an OpenAI-compatible STAND-IN answering with gold labels (no strong model runs
   here): an upper bound on what an API model answers.
3. Batch A of tickets neither model trained on flows through; `edgedistill harvest export`;
   `edgedistill build SPEC --add-traces harvest.tar` gives `after`. Both are shipped as tars
   (files only, no images) and installed with install-bundle.sh into one prefix (START=0):
   `after` over `before`, which stays for rollback.
4. A fresh batch B of the same kind (other problems again) flows through the installed
   `after` and, side by side, through `before`: the share of calls sent to the API and the
   system's quality, each with its Wilson interval, at each bundle's own calibrated
   threshold. Each model also answers batch B alone (its local accuracy), and from those
   answers the share each would send to reach the same system quality on B: an analysis of
   the two models, not a threshold either bundle could have chosen.

Writes bench/results/edge_loop.json. About 45 minutes on 2 cores (two builds).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.results import write_results
from services.builder.calibrate import choose_threshold, fallback_curve
from services.core.api import pb
from services.core.client import InferenceClient
from services.core.stats import wilson_interval
from testkit.openai_standin import OpenAIStandIn
from testkit.processes import REPO, ServerProcess, start_runtime

TICKETS = REPO / "examples" / "ticket_triage"
BEFORE_ROWS = 36  # six per queue: a start that leaves the router work to do
BATCH_A, BATCH_B = 200, 120  # 36 + 200 + 120 of the 360 train tickets
SPEC = """
name: edge-loop
program: examples.ticket_triage.program:build
data: {{train: train.jsonl, dev: {dev}}}
metric: exact_match
baselines: {{few_shot_k: 0}}
router: {{target_retention: 0.95}}
output: {output}
"""


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def split_rows() -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """The small start (balanced across queues), then batches A and B from the other train
    rows: every train ticket states a different problem, so no batch repeats another's."""
    rows = read_jsonl(TICKETS / "train.jsonl")
    start: list[dict[str, str]] = []
    for category in sorted({r["category"] for r in rows}):
        start += [r for r in rows if r["category"] == category][: BEFORE_ROWS // 6]
    rest = [r for r in rows if r not in start]
    random.Random(0).shuffle(rest)
    return start, rest[:BATCH_A], rest[BATCH_A : BATCH_A + BATCH_B]


def cli(*args: str, cwd: Path = REPO) -> str:
    proc = subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=cwd,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode not in (0, 4):  # 4: under the quality gate, still measured
        raise RuntimeError(f"edgedistill {args[0]} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def local_answers(target: str, batch: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The model alone on each ticket, in the shape the calibrate stage reads."""
    answers = []
    with InferenceClient(target, timeout_s=120) as client:
        for row in batch:
            reply = client.predict({"ticket": row["ticket"]})
            parsed = reply.outcome == pb.PREDICT_OUTCOME_PARSED
            answers.append({"outcome": "parsed" if parsed else "unparsed",
                            "confidence": reply.confidence,
                            "score": float(reply.outputs.get("category", "").strip()
                                           == row["category"])})  # fmt: skip
    return answers


def flow(
    bundle: Path,
    batch: list[dict[str, str]],
    api: str,
    harvest: Path | None,
    local_only: bool = False,
) -> dict[str, Any]:
    """A batch through a runtime and a hybrid router at the bundle's own threshold; with
    `local_only`, first through the runtime alone."""
    threshold = json.loads((bundle / "calibration.json").read_text())["threshold"]
    # A small start may be under its quality gate: the router is what serves it here.
    runtime = start_runtime("--bundle", str(bundle), "--n-ctx", "2048", "--allow-failed-gate")
    answers = local_answers(runtime.target, batch) if local_only else None
    extra = ["--allow-failed-gate", *(["--harvest", str(harvest)] if harvest else [])]
    router = ServerProcess(["route", "--bundle", str(bundle), "--local", runtime.target,
                            "--port", "0", "--metrics-port", "0", "--mode", "hybrid",
                            "--threshold", str(threshold), "--fallback-model",
                            "openai/gold-teacher", "--fallback-api-base", api, *extra])  # fmt: skip
    correct = fell_back = 0
    try:
        router.wait_serving(60)
        with InferenceClient(router.target, timeout_s=120) as client:
            for row in batch:
                reply = client.predict({"ticket": row["ticket"]})
                correct += reply.outputs.get("category", "").strip() == row["category"]
                fell_back += reply.served_by == pb.SERVED_BY_FALLBACK
    finally:
        router.terminate()
        runtime.terminate()
    n = len(batch)
    result = {"n": n, "threshold": threshold,
              "fallback_rate": fell_back / n, "fallback_interval": wilson_interval(fell_back, n),
              "quality": correct / n, "quality_interval": wilson_interval(correct, n)}  # fmt: skip
    if answers is not None:
        right = round(sum(a["score"] for a in answers))
        result |= {"local_answers": answers, "local_accuracy": right / n,
                   "local_interval": wilson_interval(right, n)}  # fmt: skip
    return result


def fallback_for_quality(answers: list[dict[str, Any]], quality: float) -> dict[str, Any]:
    """The fewest calls a model must send to the (always right) API for the system to reach
    `quality` on these answers, and the threshold that does it."""
    gold = [{"score": 1.0} for _ in answers]
    point = choose_threshold(fallback_curve(answers, gold), 1.0, quality)
    sent = round(point["fallback_rate"] * len(answers))
    return {"quality": point["system_quality"], "threshold": point["threshold"],
            "fallback_rate": point["fallback_rate"],
            "fallback_interval": wilson_interval(sent, len(answers))}  # fmt: skip


def install(tar: Path, prefix: Path) -> Path:
    env = {"PATH": os.environ["PATH"], "PREFIX": str(prefix), "START": "0"}
    subprocess.run(["sh", str(REPO / "scripts" / "install-bundle.sh"), str(tar)], check=True,
                   env=env, capture_output=True, text=True)  # fmt: skip
    return prefix / "edge-loop" / "current" / "bundle"


def main() -> None:
    console = Console()
    start, batch_a, batch_b = split_rows()
    gold = {r["ticket"]: r["category"] for r in read_jsonl(TICKETS / "train.jsonl")}
    with tempfile.TemporaryDirectory(prefix="edge-loop-") as tmp:
        work = Path(tmp)
        (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in start))
        spec = work / "spec.yaml"
        spec.write_text(SPEC.format(dev=TICKETS / "dev.jsonl", output=work / "before"))
        console.print(f"edge loop: building `before` from {len(start)} train rows")
        cli("build", str(spec), "--version", "1.0.0")
        with OpenAIStandIn(gold) as api:
            console.print(f"edge loop: batch A ({len(batch_a)} tickets) through `before`")
            first = flow(work / "before" / "bundle", batch_a, api.base_url, work / "harvest")
            cli("harvest", "export", str(work / "harvest"), str(work / "harvest.tar"))
            console.print("edge loop: building `after` with --add-traces harvest.tar")
            spec.write_text(SPEC.format(dev=TICKETS / "dev.jsonl", output=work / "after"))
            cli("build", str(spec), "--version", "1.1.0", "--add-traces",
                str(work / "harvest.tar"))  # fmt: skip
            prefix = work / "site"
            for name in ("before", "after"):
                cli("ship", str(work / name / "bundle"), "--out", str(work / "dist"))
            # The retrained model as a site holding the images would get it (IDs for the
            # size only: this bench installs files, not containers).
            ids = [f"runtime=sha256:{'0' * 64}", f"router=sha256:{'1' * 64}"]
            model_only = cli("ship", str(work / "after" / "bundle"), "--out",
                             str(work / "model-only"), "--model-only", "--requires", ids[0],
                             "--requires", ids[1])  # fmt: skip
            model_only_mb = Path(model_only.strip().splitlines()[-1]).stat().st_size / 1e6
            install(work / "dist" / "edge-loop-1.0.0.tar", prefix)
            installed = install(work / "dist" / "edge-loop-1.1.0.tar", prefix)
            releases = sorted(p.name for p in (prefix / "edge-loop" / "releases").iterdir())
            console.print(f"edge loop: batch B ({len(batch_b)} tickets) through both")
            before_b = flow(work / "before" / "bundle", batch_b, api.base_url, None, True)
            after_b = flow(installed, batch_b, api.base_url, None, True)
        harvest = json.loads((work / "after" / "traces" / "harvest.json").read_text())
        shutil.rmtree(work / "before", ignore_errors=True)
    results = {
        "harvested": harvest, "installed_releases": releases,
        "model_only_tar_mb": round(model_only_mb, 1),
        "batch_a_before": first, "batch_b_before": before_b, "batch_b_after": after_b,
        "fallback_ratio_after_over_before": (after_b["fallback_rate"] / before_b["fallback_rate"]
                                             if before_b["fallback_rate"] else None),
        # Same system quality on B for both: the quality `before` reached there.
        "matched_quality_b": {
            name: fallback_for_quality(r["local_answers"], before_b["quality"])
            for name, r in (("before", before_b), ("after", after_b))
        },
    }  # fmt: skip
    settings = {"before_rows": len(start), "batch_a": BATCH_A, "batch_b": BATCH_B,
                "api": "gold-label stand-in", "spec": SPEC.strip()}  # fmt: skip
    write_results("edge_loop", settings, results)
    show(console, results)


def show(console: Console, results: dict[str, Any]) -> None:
    table = Table(title="The edge loop (API: gold-label STAND-IN)")
    for column in ("batch / model", "n", "to the API [95% CI]", "system quality [95% CI]"):
        table.add_column(column)
    rows = (("batch_a_before", "A / before (harvested)"), ("batch_b_before", "B / before"),
            ("batch_b_after", "B / after"))  # fmt: skip
    for key, label in rows:
        r = results[key]
        fb, q = r["fallback_interval"], r["quality_interval"]
        table.add_row(label, str(r["n"]), f"{r['fallback_rate']:.1%} [{fb[0]:.1%}–{fb[1]:.1%}]",
                      f"{r['quality']:.1%} [{q[0]:.1%}–{q[1]:.1%}]")  # fmt: skip
    console.print(table)
    for name in ("before", "after"):
        r, m = results[f"batch_b_{name}"], results["matched_quality_b"][name]
        lo, hi = r["local_interval"]
        console.print(f"B / {name} alone: {r['local_accuracy']:.1%} [{lo:.1%}–{hi:.1%}]; to "
                      f"reach {m['quality']:.1%} it sends {m['fallback_rate']:.1%}")  # fmt: skip
    console.print(f"model-only tar of `after`: {results['model_only_tar_mb']:.0f} MB")


if __name__ == "__main__":
    main()
