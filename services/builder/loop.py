"""The retrain loop (`loop:` and `traces.initial` in the spec), top to bottom.

Round 1 trains on `traces.initial` train rows (a seeded sample; all by default). A round is
the build's stages up to the quantizations plus a gate on the calibration part, keyed and
resumable in BUILD/rounds/N. Under the gate, the next round adds traces from the first source
in `loop.sources` with any left (train rows not used yet, or inputs the API teacher writes)
and trains again from the base on every trace so far. The round that passes, or the last
one, is evaluated, calibrated and packaged like any build, its bundle published as
BUILD/bundle with every round in its report. Held-out inputs never enter training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from services.builder import rounds
from services.builder.context import BuildContext, RoundInputs
from services.builder.data import input_key
from services.builder.spec import BuildSpec
from services.builder.stages import Stage, StageRunner
from services.builder.stages.base import share_stages
from services.builder.stages.rounds import GATE, WRITE


@dataclass
class RowPlan:
    """The train rows in the order rounds take them, held-out inputs removed."""

    rows: list[Any]
    used: int
    held_out: int  # train rows dropped: the same input is in the calibration or test part

    @classmethod
    def make(cls, ctx: BuildContext) -> RowPlan:
        ordered = [ctx.trainset[i] for i in rounds.row_order(len(ctx.trainset), ctx.spec.seed)]
        kept = [e for e in ordered if input_key(dict(e.inputs())) not in ctx.held_out_keys]
        used = rounds.initial_count(len(kept), ctx.spec.traces.initial)
        return cls(rows=kept, used=used, held_out=len(ordered) - len(kept))

    def take(self, count: int) -> list[Any]:
        taken = self.rows[self.used : self.used + count]
        self.used += len(taken)
        return taken


@dataclass
class LoopResult:
    ctx: BuildContext  # the last round's, its final stages run
    ran: list[str]
    skipped: list[str]


def run_loop(spec: BuildSpec, console: Console, stages: Sequence[Stage]) -> LoopResult:
    """Rounds until the gate passes on the calibration part or nothing more can be added,
    then the last round's evaluation, calibration and bundle."""
    cut = [s.name for s in stages].index("quantize") + 1
    round_stages, final_stages = (*stages[:cut], GATE), stages[cut:]
    plan = RowPlan.make(BuildContext.load(spec, console))
    if plan.held_out:
        console.print(f"  [yellow]warning:[/] {plan.held_out} train rows repeat a held-out "
                      "input and are not used", highlight=False)  # fmt: skip
    inputs = RoundInputs(number=1, rows=plan.rows[: plan.used])
    history: list[dict[str, Any]] = []
    runners: list[StageRunner] = []
    while True:
        console.rule(f"round {inputs.number}")
        ctx, runner = run_round(spec, console, round_stages, inputs)
        runners.append(runner)
        history.append(round_summary(ctx, inputs))
        following, stop = next_round(ctx, runner, plan, inputs)
        if following is None:
            break
        inputs = following
    console.print(f"loop: {stop} (round {inputs.number})", highlight=False)
    ctx.rounds = {"rounds": history, "stopped": stop, "max_rounds": spec.loop.max_rounds,
                  "held_out_train_rows": plan.held_out}  # fmt: skip
    for stage in final_stages:
        runner.run(stage, ctx)
    return LoopResult(ctx, ran=[name for r in runners for name in r.ran],
                      skipped=[name for r in runners for name in r.skipped])  # fmt: skip


def run_round(
    spec: BuildSpec, console: Console, stages: Sequence[Stage], inputs: RoundInputs
) -> tuple[BuildContext, StageRunner]:
    folder = spec.output / "rounds" / str(inputs.number)
    # Round 1's base checkpoint (and converted GGUF) serve every round.
    share_stages(spec.output / "rounds" / "1", folder, ("convert", "student"))
    ctx = BuildContext.load(spec.model_copy(update={"output": folder}), console)
    ctx.round = inputs
    runner = StageRunner(folder, console)
    for stage in stages:
        runner.run(stage, ctx)
    return ctx, runner


def next_round(
    ctx: BuildContext, runner: StageRunner, plan: RowPlan, inputs: RoundInputs
) -> tuple[RoundInputs | None, str]:
    """The next round's inputs, or None and why the loop stops."""
    spec = ctx.spec
    gate = ctx.read_json("gate", "gate.json")
    source = rounds.next_source(spec.loop.sources, len(plan.rows) - plan.used,
                                api_teacher=not spec.teacher.is_gold)  # fmt: skip
    stop = rounds.stop_reason(gate, inputs.number, spec.loop.max_rounds, source)
    if stop is not None:
        return None, stop
    carried = [ctx.dirs["traces"] / "traces.jsonl"]
    rows: list[Any] = []
    if source == "train":
        rows = plan.take(spec.loop.traces_per_round)
    else:
        runner.run(WRITE, ctx)
        written = ctx.dirs["write"] / "written.jsonl"
        if not written.read_text().strip():
            return None, "under the gate: the teacher wrote no input it answered the same twice"
        carried.append(written)
    teacher = inputs.teacher_calibration or ctx.read_json("gate", "teacher.json")
    return RoundInputs(inputs.number + 1, rows, carried, teacher), ""


def round_summary(ctx: BuildContext, inputs: RoundInputs) -> dict[str, Any]:
    """What the round added, by source, and its gate on the calibration part."""
    traces = ctx.traces()
    carried = sum(len(p.read_text().splitlines()) for p in inputs.carried)
    added: dict[str, int] = {}
    for trace in traces[carried:]:
        source = trace.get("source", "train")
        added[source] = added.get(source, 0) + 1
    if inputs.carried:  # the round before's teacher-written traces are this round's addition
        written = [p for p in inputs.carried if p.name == "written.jsonl"]
        if written:
            added["teacher-written"] = len(written[0].read_text().splitlines())
    gate = ctx.read_json("gate", "gate.json")
    return {"round": inputs.number, "added": added, "traces": len(traces),
            "folder": f"rounds/{inputs.number}", "calibration": gate}  # fmt: skip
