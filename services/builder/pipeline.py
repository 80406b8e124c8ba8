"""`edgedistill build SPEC`: the whole build, top to bottom.

The stages are declarations (services/builder/stages/): each names the inputs its cache key
comes from and writes only into its own folder under BUILD/. A stage whose key is unchanged is
skipped on a rerun; see stages/base.py for how keys are derived and folders published.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from services.builder import choice
from services.builder.context import BuildContext, load_program
from services.builder.data import imbalance, label_counts, unseen_in_train
from services.builder.loop import run_loop
from services.builder.metrics import score
from services.builder.spec import BuildSpec, StudentSpec
from services.builder.stages import STAGES, Stage, StageRunner
from services.builder.stages.base import share_stages
from services.builder.teacher import ask_once
from services.core.harvest import HarvestError, read_harvest
from services.core.logs import console_width

__all__ = ["STAGES", "BuildResult", "QualityGateFailed", "build", "load_program"]


class QualityGateFailed(RuntimeError):
    """The distilled student kept too little of the teacher's quality."""


@dataclass
class BuildResult:
    bundle: Path | None  # None when the stages run do not include packaging
    skipped: list[str]
    ran: list[str]
    seconds: float


def log_friendly_console() -> Console:
    """A log file gets the full tables: a terminal-less Console would cut them at 80 columns."""
    return Console(width=console_width(sys.stdout))


def quiet_libraries() -> None:
    """In a log, no carriage-return progress bars (tqdm, Hugging Face) and no library
    deprecation notices that mean nothing to the user."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def describe_labels(ctx: BuildContext) -> None:
    """Each label field's distribution in train, calibration and test, with a warning where
    one value dominates (the model can learn to always say it) or a held-out label is in no
    train row."""
    parts = {"train": ctx.trainset, "calibration": ctx.calibset, "test": ctx.testset}
    for name in ctx.label_names:
        train = label_counts(ctx.trainset, name)
        choice = name in ctx.choices
        for part, rows in parts.items():
            counts = label_counts(rows, name)
            shown = ", ".join(f"{value} {n}" for value, n in counts.most_common())
            ctx.console.print(f"  {name} in {part}: {escape(shown)}", highlight=False)
            unseen = unseen_in_train(counts, train, choice)
            for problem in (imbalance(counts, len(train)), unseen):
                if problem:
                    ctx.console.print(f"  [yellow]warning:[/] {name} in {part}: "
                                      f"{escape(problem)}", highlight=False)  # fmt: skip


def build(
    spec: BuildSpec, console: Console | None = None, stages: Sequence[Stage] = STAGES
) -> BuildResult:
    """One student: every stage. Several (`students:`): see build_students."""
    console = build_console(console)
    verify_harvests(spec)
    if len(spec.students) > 1:
        return build_students(spec, console, stages)
    if spec.students:
        spec = spec.model_copy(update={"student": StudentSpec(source=spec.students[0])})
    if spec.loop.max_rounds > 1 or spec.traces.initial is not None:
        return build_rounds(spec, console, stages)
    started = time.perf_counter()
    ctx, runner = run_stages(spec, console, stages)
    check_gate(ctx)
    return BuildResult(bundle=ctx.dirs.get("package"), skipped=runner.skipped, ran=runner.ran,
                       seconds=time.perf_counter() - started)  # fmt: skip


def build_console(console: Console | None) -> Console:
    """The build's console; libraries kept quiet in a log, and offline about prices."""
    console = console or log_friendly_console()
    if not console.is_terminal:
        quiet_libraries()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch
    return console


def check(spec: BuildSpec, console: Console | None = None) -> BuildContext:
    """What a build reads, checked as the build checks it before any stage runs (the spec,
    the program, every data row, the metric on the train labels, the harvests), and an API
    teacher asked one train row. Nothing is trained, and no stage folder is written."""
    console = build_console(console)
    verify_harvests(spec)
    if spec.students:
        spec = spec.model_copy(update={"student": StudentSpec(source=spec.students[0])})
    ctx = BuildContext.load(spec, console)
    describe_labels(ctx)
    steps = len(ctx.pipeline.predictors) if ctx.pipeline else 1
    console.print(f"  program: {spec.program}, {steps} predictor(s): "
                  f"{', '.join(ctx.input_names)} -> {', '.join(ctx.output_names)}",
                  highlight=False)  # fmt: skip
    console.print(f"  rows: {len(ctx.trainset)} train, {len(ctx.calibset)} calibration, "
                  f"{len(ctx.testset)} test", highlight=False)  # fmt: skip
    if not spec.teacher.is_gold:
        runner = ctx.runner if ctx.pipeline else None
        answer = ask_once(ctx.program, spec.teacher, ctx.trainset[0], runner)
        if isinstance(answer, str):
            console.print(f"  [yellow]warning:[/] teacher {spec.teacher.model} answered, but "
                          f"train row 1 failed: {escape(answer)}", highlight=False)  # fmt: skip
        else:
            shown = {name: answer.get(name) for name in ctx.output_names}
            value = score(ctx.metric, ctx.trainset[0], shown)
            kept = "kept" if value >= ctx.threshold else "not kept"
            console.print(f"  teacher {spec.teacher.model} answers train row 1: "
                          f"{escape(str(shown))}, scoring {value:.2f} against its labels "
                          f"({kept}: metric_threshold {ctx.threshold:g})",
                          highlight=False)  # fmt: skip
    return ctx


def verify_harvests(spec: BuildSpec) -> None:
    """Every added harvest's checksums (and signature) verified before any stage runs: a
    tampered or truncated tar costs no minutes of training."""
    for path in spec.traces.added:
        try:
            read_harvest(path, spec.traces.public_key)
        except HarvestError as err:
            raise HarvestError(
                f"traces.added: {err}; export it again on the edge host "
                "(`edgedistill harvest export`) and carry the new tar"
            ) from None


def run_stages(
    spec: BuildSpec, console: Console, stages: Sequence[Stage],
    compared: dict[str, Any] | None = None,
) -> tuple[BuildContext, StageRunner]:  # fmt: skip
    ctx = BuildContext.load(spec, console)
    ctx.compared = compared
    describe_labels(ctx)
    runner = StageRunner(spec.output, console)
    for stage in stages:
        runner.run(stage, ctx)
    return ctx, runner


def check_gate(ctx: BuildContext) -> None:
    verdict = ctx.verdict()
    if verdict is not None and not verdict["teacher_score"]:
        raise QualityGateFailed(
            "FAILED quality gate: the teacher scores 0 on the test part, so there is no quality "
            "to keep. Check the teacher (teacher.model, its answers in traces/traces.jsonl), "
            "the metric, and the held-out labels; the build folder keeps everything."
        )
    if verdict is not None and not verdict["passed"]:
        raise QualityGateFailed(
            f"FAILED quality gate: distilled {ctx.default_quant} keeps "
            f"{verdict['retention']:.0%} of the teacher's quality, under "
            f"quality_gate.min_retention={ctx.spec.quality_gate.min_retention:.0%}. "
            "Artifacts are kept in the build folder. To improve: add traces (more or more varied "
            "train examples, an API teacher), use a larger student, or serve in hybrid mode with "
            "the router so low-confidence requests go to the teacher."
        )


def build_rounds(spec: BuildSpec, console: Console, stages: Sequence[Stage]) -> BuildResult:
    """The retrain loop (loop.py): rounds in BUILD/rounds/N, the last one's bundle published
    as BUILD/bundle."""
    started = time.perf_counter()
    describe_labels(BuildContext.load(spec, console))
    result = run_loop(spec, console, stages)
    bundle = result.ctx.dirs.get("package")
    if bundle is not None:
        bundle = publish(bundle, spec.output / "bundle")
        console.print(f"bundle: {bundle}")
    check_gate(result.ctx)
    return BuildResult(bundle=bundle, skipped=result.skipped, ran=result.ran,
                       seconds=time.perf_counter() - started)  # fmt: skip


def build_students(spec: BuildSpec, console: Console, stages: Sequence[Stage]) -> BuildResult:
    """Each student built and evaluated in BUILD/students/NAME (the teacher's traces and the
    dataset made once), the one `choice` picks packaged with the comparison, and its bundle
    published as BUILD/bundle."""
    started = time.perf_counter()
    unpackaged = [stage for stage in stages if stage.name != "package"]
    candidates, ran, skipped = [], [], []
    for source in spec.students:
        console.rule(f"student {source}")
        sub = candidate_spec(spec, source)
        # The first candidate's traces and dataset: the teacher is asked once.
        first = spec.output / "students" / student_folder(spec.students[0])
        share_stages(first, sub.output, ("traces", "dataset"))
        ctx, runner = run_stages(sub, console, unpackaged)
        ran += runner.ran
        skipped += runner.skipped
        verdict = ctx.verdict()
        passed = verdict is None or bool(verdict["passed"])
        candidates.append(choice.candidate(source, ctx.student.description, sub.output, passed))
    if not any(c.passed_gate for c in candidates):
        raise QualityGateFailed(
            "FAILED quality gate: no student keeps quality_gate.min_retention="
            f"{spec.quality_gate.min_retention:.0%} of the teacher's quality (each one's report "
            f"is under {spec.output / 'students'}). Add traces, or try a larger student."
        )
    chosen = choice.choose(candidates, spec.choice)
    compared = choice.comparison(candidates, chosen, spec.choice)
    console.rule(f"shipping {chosen.source}")
    ctx, runner = run_stages(candidate_spec(spec, chosen.source), console, stages, compared)
    bundle = publish(ctx.dirs["package"], spec.output / "bundle")
    console.print(f"bundle: {bundle} (student {chosen.source})")
    return BuildResult(bundle=bundle, skipped=skipped + runner.skipped, ran=ran + runner.ran,
                       seconds=time.perf_counter() - started)  # fmt: skip


def student_folder(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source).name or source).strip("-") or "student"


def candidate_spec(spec: BuildSpec, source: str) -> BuildSpec:
    return spec.model_copy(update={
        "student": StudentSpec(source=source), "students": [],
        "output": spec.output / "students" / student_folder(source),
    })  # fmt: skip


def publish(bundle: Path, target: Path) -> Path:
    """The chosen bundle at BUILD/bundle (hard links: no second copy of the GGUFs)."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(bundle, partial, copy_function=os.link)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target
