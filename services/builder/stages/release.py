"""Stages 6–8: evaluation on held-out data, router calibration, and the bundle."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.builder import calibrate, evaluate, report
from services.builder.context import BuildContext
from services.builder.package import write_bundle
from services.builder.stages.base import Stage, progress_bar
from services.core.gguf_metadata import chat_template, quantization_name, read_gguf_metadata


def evaluate_variants(ctx: BuildContext, out: Path) -> None:
    """Teacher, untuned student and each quantization on the dev set, as the runtime serves."""
    spec = ctx.spec
    program_path = out / "program.json"
    ctx.program_spec.save(program_path)
    common = {
        "program_path": program_path, "dev_rows": [dict(e.items()) for e in ctx.devset],
        "input_names": ctx.codec.input_names, "metric_name": spec.metric,
        "max_tokens": spec.eval_max_tokens, "n_threads": spec.n_threads,
    }  # fmt: skip
    untuned = quantization_name(read_gguf_metadata(ctx.base_gguf))
    targets = [(f"untuned student ({untuned})", ctx.base_gguf)]
    targets += [(f"distilled {q}", path) for q, path in ctx.ggufs.items()]
    with progress_bar(ctx.console) as bar:
        task = bar.add_task("evaluate", total=len(targets) + 1, note="teacher")
        teacher_result = evaluate.evaluate_teacher(
            program=ctx.program, teacher=spec.teacher, devset=ctx.devset, metric=ctx.metric,
            output_names=ctx.codec.output_names,
        )  # fmt: skip
        bar.advance(task)
        results = []
        for label, path in targets:
            bar.update(task, note=label)
            results.append(evaluate.evaluate_gguf(label=label, gguf_path=path, **common))  # type: ignore[arg-type]
            bar.advance(task)
    evaluation = {
        "name": spec.name,
        "dev_examples": len(ctx.devset),
        "metric": spec.metric,
        "teacher": teacher_result,
        "students": results,
    }
    evaluate.write_eval(out / "eval.json", evaluation)


def calibrate_router(ctx: BuildContext, out: Path) -> None:
    """The threshold for the default quantization, and the reports."""
    evaluation = ctx.read_json("evaluate", "eval.json")
    label = f"distilled {ctx.default_quant}"
    variant = next(s for s in evaluation["students"] if s["label"] == label)
    result = calibrate.calibrate(
        variant["examples"], evaluation["teacher"]["examples"],
        target_retention=ctx.spec.router.target_retention, variant=ctx.default_quant,
    )  # fmt: skip
    (out / "calibration.json").write_text(json.dumps(result, indent=2))
    shutil.copy2(ctx.dirs["evaluate"] / "eval.json", out / "eval.json")
    report.write_reports(evaluation, result, out)


def print_summary(ctx: BuildContext, folder: Path) -> None:
    report.print_table(ctx.read_json("evaluate", "eval.json"), ctx.console)
    calibration = ctx.read_json("calibrate", "calibration.json")
    ctx.console.print(
        f"router: threshold {calibration['threshold']:.4f} sends "
        f"{calibration['fallback_rate']:.1%} to the teacher for "
        f"{calibration['system_quality']:.1%} quality"
    )


def package(ctx: BuildContext, out: Path) -> None:
    """Everything the runtime and router need, verifiable: written into this stage's folder,
    which is published as BUILD/bundle."""
    spec = ctx.spec
    write_bundle(
        out,
        name=spec.name,
        version=spec.version or datetime.now(UTC).strftime("%Y.%m.%d-%H%M%S"),
        ggufs=ctx.ggufs,
        program=ctx.program_spec,
        chat_template=chat_template(ctx.base_gguf),
        evaluation_dir=ctx.dirs["calibrate"],
        calibration=ctx.read_json("calibrate", "calibration.json"),
        provenance=provenance(ctx),
    )


def provenance(ctx: BuildContext) -> dict[str, Any]:
    """Where the bundle comes from; each value is covered by the package stage's key."""
    return {
        "base_model": {"source": ctx.student.description, "sha256": ctx.base_gguf_sha256},
        "teacher": ctx.spec.teacher.model,
        "datasets": ctx.dataset_hashes,
        "metric": ctx.spec.metric,
        "traces": ctx.read_json("traces", "counts.json"),
        "quality_gate": ctx.verdict(),
    }


def package_inputs(ctx: BuildContext) -> dict[str, Any]:
    return {
        "version": ctx.spec.version,
        "quality_gate": ctx.spec.quality_gate.model_dump(),
    }


EVALUATE = Stage(
    "evaluate", evaluate_variants, after=("quantize",),
    inputs=lambda ctx: {**ctx.task_inputs(), "teacher": ctx.teacher_settings(),
                        "max_tokens": ctx.spec.eval_max_tokens},
)  # fmt: skip
CALIBRATE = Stage(
    "calibrate", calibrate_router, after=("evaluate",),
    inputs=lambda ctx: {"router": ctx.spec.router.model_dump()}, report=print_summary,
)  # fmt: skip
PACKAGE = Stage(
    "package", package, after=("calibrate", "traces", "student"), inputs=package_inputs,
    report=lambda ctx, folder: ctx.console.print(f"bundle: {folder}"), folder="bundle",
)  # fmt: skip
