"""Stages 6–8: evaluation on held-out data, router calibration, and the bundle."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.builder import calibrate, decision, evaluate, report
from services.builder.context import BuildContext, trace_examples
from services.builder.package import write_bundle
from services.builder.stages.base import Stage, progress_bar
from services.core.config import RuntimeSettings
from services.core.gguf_metadata import chat_template, quantization_name, read_gguf_metadata
from services.core.stats import score_interval


def serving_max_tokens(ctx: BuildContext) -> int:
    """The spec's eval_max_tokens, else what the runtime gives a call that sets none."""
    default = RuntimeSettings.model_fields["max_tokens_default"].default
    return ctx.spec.eval_max_tokens or int(default)


def few_shot_program(ctx: BuildContext, out: Path) -> Path | None:
    """The program with k labelled train rows as demos, as dspy.LabeledFewShot picks them."""
    k = ctx.spec.baselines.few_shot_k
    if k == 0:
        return None
    import dspy

    compiled = dspy.LabeledFewShot(k=k).compile(ctx.program.deepcopy(), trainset=ctx.trainset)
    return ctx.write_program(out / "program.few-shot", compiled)


def evaluate_variants(ctx: BuildContext, out: Path) -> None:
    """Teacher, untuned baselines and each quantization on held-out rows, as the runtime
    serves. The teacher and the default quantization answer both parts (calibration needs
    them); the others only the test part, which is all the report shows."""
    spec = ctx.spec
    program_path = ctx.write_program(out / "program")
    held_out = ctx.calibset + ctx.testset
    splits = ["calibration"] * len(ctx.calibset) + ["test"] * len(ctx.testset)
    untuned = quantization_name(read_gguf_metadata(ctx.base_gguf))
    targets = [(f"untuned student ({untuned}), zero-shot", ctx.base_gguf, program_path)]
    few_shot = few_shot_program(ctx, out)
    if few_shot is not None:
        k = spec.baselines.few_shot_k
        targets.append((f"untuned student ({untuned}), {k}-shot", ctx.base_gguf, few_shot))
    targets += [(f"distilled {q}", path, program_path) for q, path in ctx.ggufs.items()]
    raised = len(ctx.metric.errors)
    with progress_bar(ctx.console) as bar:
        task = bar.add_task("evaluate", total=len(targets) + 1, note="teacher")
        teacher_result = evaluate.evaluate_teacher(
            program=ctx.program, teacher=spec.teacher, examples=held_out, splits=splits,
            metric=ctx.metric, output_names=ctx.output_names, arguments=ctx.forward_arguments,
        )  # fmt: skip
        teacher_result["fields"] = evaluate.field_scores(
            held_out, teacher_result["examples"], ctx.exact_names, ctx.free_text_names
        )
        bar.advance(task)
        results = []
        for label, gguf, program in targets:
            bar.update(task, note=label)
            both = label == f"distilled {ctx.default_quant}"
            rows = held_out if both else ctx.testset
            result = evaluate.evaluate_gguf(
                label=label, gguf_path=gguf, program_path=program, examples=rows,
                splits=splits if both else ["test"] * len(ctx.testset),
                input_names=ctx.input_names, metric=ctx.metric,
                max_tokens=serving_max_tokens(ctx), n_threads=spec.n_threads,
                num_threads=spec.teacher.num_threads,
            )  # fmt: skip
            result["fields"] = evaluate.field_scores(
                rows, result["examples"], ctx.exact_names, ctx.free_text_names
            )
            results.append(result)
            bar.advance(task)
    evaluation = {
        "name": spec.name,
        "metric": spec.metric,
        "split": {"calibration": len(ctx.calibset), "test": len(ctx.testset),
                  "source": "data.test" if spec.data.test else "data.dev split by group"},
        "max_tokens": serving_max_tokens(ctx),
        "teacher": teacher_result,
        "students": results,
        "judge": judge_summary(ctx),
        "harvest": harvest_before_after(ctx, program_path),
        "metric_errors": ctx.metric_errors_since(raised, "answers"),
    }  # fmt: skip
    evaluate.write_eval(out / "eval.json", evaluation)


def harvest_before_after(ctx: BuildContext, program_path: Path) -> dict[str, Any] | None:
    """Harvested inputs (now traces), against the API's answers: as the edge's model answered
    them (recorded in the harvest) and as the default quantization of this build does."""
    path = ctx.dirs["traces"] / "harvest.jsonl"
    kept = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    if not kept:
        return None
    examples = trace_examples(kept, ctx.metric.annotations)
    threads = ctx.spec.teacher.num_threads
    before = evaluate.score_all(ctx.metric, examples, [t["local_outputs"] for t in kept], threads)
    after = evaluate.evaluate_gguf(
        label="harvested inputs", gguf_path=ctx.ggufs[ctx.default_quant],
        program_path=program_path, examples=examples, splits=["test"] * len(examples),
        input_names=ctx.input_names, metric=ctx.metric, max_tokens=serving_max_tokens(ctx),
        n_threads=ctx.spec.n_threads, num_threads=threads,
    )  # fmt: skip
    return {"n": len(kept), "before": {"score": sum(before) / len(before),
                                       "interval": score_interval(before)},
            "after": {"score": after["score"], "interval": after["interval"]}}  # fmt: skip


def judge_summary(ctx: BuildContext) -> dict[str, Any] | None:
    """An LM-judged metric's calls over the whole build so far (traces and evaluation)."""
    judge = getattr(ctx.metric, "lm", None)
    if judge is None:
        return None
    from services.builder.judge import lm_usage

    return {"model": judge.model, "failures": ctx.metric.failures, **lm_usage(judge)}


def calibrate_router(ctx: BuildContext, out: Path) -> None:
    """The threshold for the default quantization, the decision, and the reports."""
    evaluation = ctx.read_json("evaluate", "eval.json")
    label = f"distilled {ctx.default_quant}"
    variant = next(s for s in evaluation["students"] if s["label"] == label)
    result = calibrate.calibrate(
        variant["examples"], evaluation["teacher"]["examples"],
        target_retention=ctx.spec.router.target_retention, variant=ctx.default_quant,
    )  # fmt: skip
    choice = decision.decide(
        evaluation, result, prices=ctx.spec.cost, teacher_model=ctx.spec.teacher.model
    )
    (out / "calibration.json").write_text(json.dumps(result, indent=2))
    (out / "decision.json").write_text(json.dumps(choice, indent=2))
    shutil.copy2(ctx.dirs["evaluate"] / "eval.json", out / "eval.json")
    report.write_reports(evaluation, result, choice, out, training_summary(ctx))


def training_summary(ctx: BuildContext) -> dict[str, Any] | None:
    path = ctx.dirs["finetune"] / "loss.json" if "finetune" in ctx.dirs else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def print_summary(ctx: BuildContext, folder: Path) -> None:
    report.print_table(ctx.read_json("evaluate", "eval.json"), ctx.console)
    report.print_decision(ctx.read_json("calibrate", "decision.json"), ctx.console)
    calibration = ctx.read_json("calibrate", "calibration.json")
    gold = ctx.spec.teacher.is_gold
    ctx.console.print("router: " + report.calibration_line(calibration, gold))
    for line in report.training_lines(training_summary(ctx)):
        ctx.console.print("training: " + line, highlight=False)


def package(ctx: BuildContext, out: Path) -> None:
    """Everything the runtime and router need, verifiable: written into this stage's folder,
    which is published as BUILD/bundle."""
    spec = ctx.spec
    write_bundle(
        out,
        name=spec.name,
        version=spec.version or datetime.now(UTC).strftime("%Y.%m.%d-%H%M%S"),
        ggufs=ctx.ggufs,
        program=ctx.pipeline or ctx.program_spec,
        write_program=ctx.write_program,
        chat_template=chat_template(ctx.base_gguf),
        evaluation_dir=ctx.dirs["calibrate"],
        calibration=ctx.read_json("calibrate", "calibration.json"),
        provenance=provenance(ctx),
        compared=ctx.compared,
        rounds=ctx.rounds,
    )


def print_bundle(ctx: BuildContext, folder: Path) -> None:
    verdict = ctx.verdict()
    if verdict is not None and not verdict["passed"]:
        ctx.console.print(f"bundle: {folder} (FAILED its quality gate; kept for inspection, "
                          "served only with --allow-failed-gate)")  # fmt: skip
        return
    ctx.console.print(f"bundle: {folder}")


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
        "compared": ctx.compared,
        **({"rounds": ctx.rounds} if ctx.rounds else {}),
    }


EVALUATE = Stage(
    "evaluate", evaluate_variants, after=("quantize",),
    inputs=lambda ctx: {**ctx.held_out_inputs(), "teacher": ctx.teacher_settings(),
                        "max_tokens": serving_max_tokens(ctx),
                        "baselines": ctx.spec.baselines.model_dump()},
)  # fmt: skip
CALIBRATE = Stage(
    "calibrate", calibrate_router, after=("evaluate",),
    inputs=lambda ctx: {"router": ctx.spec.router.model_dump(), "cost": ctx.spec.cost.model_dump(),
                        "teacher": ctx.spec.teacher.model},
    report=print_summary,
)  # fmt: skip
PACKAGE = Stage(
    "package", package, after=("calibrate", "traces", "student"), inputs=package_inputs,
    report=lambda ctx, folder: print_bundle(ctx, folder), folder="bundle",
)  # fmt: skip
