"""`edgedistill build SPEC`: the whole build, top to bottom.

The stages are declarations (services/builder/stages/): each names the inputs its cache key
comes from and writes only into its own folder under BUILD/. A stage whose key is unchanged is
skipped on a rerun; see stages/base.py for how keys are derived and folders published.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from services.builder.context import BuildContext, load_program
from services.builder.data import imbalance, label_counts
from services.builder.spec import BuildSpec
from services.builder.stages import STAGES, Stage, StageRunner
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
    one value dominates (the model can learn to always say it)."""
    parts = {"train": ctx.trainset, "calibration": ctx.calibset, "test": ctx.testset}
    for name in ctx.label_names:
        values = len(label_counts(ctx.trainset, name))
        for part, rows in parts.items():
            counts = label_counts(rows, name)
            shown = ", ".join(f"{value} {n}" for value, n in counts.most_common())
            ctx.console.print(f"  {name} in {part}: {shown}", highlight=False)
            problem = imbalance(counts, values)
            if problem:
                ctx.console.print(f"  [yellow]warning:[/] {name} in {part}: {problem}",
                                  highlight=False)  # fmt: skip


def build(
    spec: BuildSpec, console: Console | None = None, stages: Sequence[Stage] = STAGES
) -> BuildResult:
    console = console or log_friendly_console()
    if not console.is_terminal:
        quiet_libraries()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch
    started = time.perf_counter()
    ctx = BuildContext.load(spec, console)
    describe_labels(ctx)
    runner = StageRunner(spec.output, console)
    for stage in stages:
        runner.run(stage, ctx)
    verdict = ctx.verdict()
    if verdict is not None and not verdict["passed"]:
        raise QualityGateFailed(
            f"FAILED quality gate: distilled {ctx.default_quant} keeps "
            f"{verdict['retention']:.0%} of the teacher's quality, under "
            f"quality_gate.min_retention={spec.quality_gate.min_retention:.0%}. "
            "Artifacts are kept in the build folder. To improve: add traces (more or more varied "
            "train examples, an API teacher), use a larger student, or serve in hybrid mode with "
            "the router so low-confidence requests go to the teacher."
        )
    return BuildResult(
        bundle=ctx.dirs.get("package"),
        skipped=runner.skipped,
        ran=runner.ran,
        seconds=time.perf_counter() - started,
    )
