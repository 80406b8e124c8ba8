"""The retrain loop's own stages: a round's gate on the calibration part, and the traces the
teacher writes for the next round (see loop.py for how rounds follow each other)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.builder import evaluate, rounds, teacher, writer
from services.builder.context import BuildContext, trace_examples
from services.builder.data import input_key, json_line
from services.builder.probe import sample
from services.builder.stages.base import Stage
from services.builder.stages.release import serving_max_tokens

# Why a written input did not become a trace.
DROPPED = ("failed", "empty", "held_out_input", "duplicate", "teacher_failed", "disagreed")
# Train traces the round's model answers to find the ones it gets wrong (the writer's seeds).
SEED_ROWS = 48


def gate_round(ctx: BuildContext, out: Path) -> None:
    """The round's default quantization and the teacher on the calibration part (never the
    test part): does the round keep quality_gate.min_retention of the teacher's quality?"""
    assert ctx.round is not None
    rows = ctx.calibset
    splits = ["calibration"] * len(rows)
    student = answer_rows(ctx, rows, splits, ctx.write_program(out / "program"))
    teacher_result = ctx.round.teacher_calibration or evaluate.evaluate_teacher(
        program=ctx.program, teacher=ctx.spec.teacher, examples=rows, splits=splits,
        metric=ctx.metric, output_names=ctx.output_names, summarised="calibration",
        arguments=ctx.forward_arguments,
    )  # fmt: skip
    verdict = rounds.round_verdict(
        [e["score"] for e in student["examples"]], [e["score"] for e in teacher_result["examples"]],
        ctx.spec.quality_gate.min_retention,
    )  # fmt: skip
    (out / "gate.json").write_text(json.dumps({"round": ctx.round.number, **verdict}, indent=2))
    evaluate.write_eval(out / "teacher.json", teacher_result)


def answer_rows(ctx: BuildContext, rows: list[Any], splits: list[str], program: Path) -> Any:
    """The default quantization's answers, as the runtime serves them."""
    return evaluate.evaluate_gguf(
        label=f"distilled {ctx.default_quant}", gguf_path=ctx.ggufs[ctx.default_quant],
        program_path=program, examples=rows, splits=splits, input_names=ctx.input_names,
        metric=ctx.metric, max_tokens=serving_max_tokens(ctx), n_threads=ctx.spec.n_threads,
        num_threads=ctx.spec.teacher.num_threads, summarised=splits[0],
    )  # fmt: skip


def print_gate(ctx: BuildContext, folder: Path) -> None:
    gate = json.loads((folder / "gate.json").read_text())
    low, high = gate["interval"]["low"], gate["interval"]["high"]
    ctx.console.print(
        f"  round {gate['round']}: calibration {gate['score']:.1%} [{low:.1%}–{high:.1%}] of "
        f"{gate['n']}, {gate['retention']:.0%} of the teacher's "
        f"({'passed' if gate['passed'] else 'under'} the gate, "
        f"min_retention {gate['min_retention']:.0%})", highlight=False,
    )  # fmt: skip


def write_traces(ctx: BuildContext, out: Path) -> None:
    """New inputs the teacher writes like the train rows this round's model gets wrong,
    answered by the teacher and kept where it agrees with itself (writer.py)."""
    spec, wanted = ctx.spec, ctx.spec.loop.traces_per_round
    traces = ctx.traces()
    seeds, wrong = wrong_rows(ctx, traces)
    hot = spec.teacher.model_copy(update={"temperature": writer.SECOND_SAMPLE_TEMPERATURE})
    lm = teacher.teacher_lm(hot)
    described = ctx.pipeline or ctx.program_spec
    candidates = writer.write_candidates(
        lm, writer.writer_signature(described.inputs),
        writer.task_description(described.instructions, described.inputs, described.outputs),
        [s["inputs"] for s in seeds], writer.OVERSAMPLE * wanted,
        first_variation=100_000 * (ctx.round.number if ctx.round else 0) + spec.seed,
        num_threads=spec.teacher.num_threads,
    )  # fmt: skip
    taken = {input_key(dict(e.inputs())) for e in ctx.trainset}
    taken |= {input_key(t["inputs"]) for t in traces}
    fresh, counts = writer.new_inputs(candidates, held_out=ctx.held_out_keys, taken=taken)
    agreed, answered = agreeing_answers(ctx, lm, fresh, out / "agreement")
    counts.update(seeds=len(seeds), seeds_wrong=wrong, agreed=len(agreed),
                  disagreed=answered["rejected"],
                  teacher_failed=len(fresh) - answered["total"] + answered["failed"])  # fmt: skip
    kept = agreed[:wanted]
    counts["kept"] = len(kept)
    with (out / "written.jsonl").open("w") as handle:
        for trace in kept:
            handle.write(json_line({**trace, "source": "teacher-written"}))
    (out / "written.json").write_text(json.dumps(dict(counts), indent=2))
    dropped = ", ".join(f"{why.replace('_', ' ')} {n}" for why, n in counts.items()
                        if why in DROPPED and n)  # fmt: skip
    ctx.console.print(f"  the teacher wrote {counts['asked']} inputs like {len(seeds)} train "
                      f"rows ({wrong} answered wrong); {len(kept)} kept"
                      + (f" (dropped: {dropped})" if dropped else ""), highlight=False)  # fmt: skip


def wrong_rows(ctx: BuildContext, traces: list[dict[str, Any]]) -> tuple[list[Any], int]:
    """The writer's seeds: a sample of the traces from real inputs that this round's model
    answers against the teacher; all of the sample when it gets none wrong."""
    real = [t for t in traces if t.get("source") != "teacher-written"]
    picked = sample(real, SEED_ROWS, ctx.spec.seed + (ctx.round.number if ctx.round else 0))
    rows = trace_examples(picked, ctx.metric.annotations)
    program = ctx.dirs["gate"] / "program" / "program.json"
    answered = answer_rows(ctx, rows, ["train"] * len(rows), program)["examples"]
    wrong = [t for t, a in zip(picked, answered, strict=True) if a["score"] < ctx.threshold]
    return (wrong or picked), len(wrong)


def agreeing_answers(
    ctx: BuildContext, lm: Any, fresh: list[dict[str, str]], folder: Path
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The teacher's traces for `fresh` inputs whose answer passes the metric against a second,
    sampled answer of the teacher's."""
    import dspy

    second = writer.second_answers(ctx.program, lm, fresh, ctx.output_names,
                                   ctx.spec.teacher.num_threads)  # fmt: skip
    labelled = [dspy.Example(**row, **answer).with_inputs(*row)
                for row, answer in zip(fresh, second, strict=True) if answer]  # fmt: skip
    folder.mkdir()
    teacher.collect_traces(
        program=ctx.program, teacher=ctx.spec.teacher, trainset=labelled, metric=ctx.metric,
        threshold=ctx.threshold, output_names=ctx.output_names, out_dir=folder,
        runner=ctx.runner if ctx.pipeline else None, require_kept=False,
    )  # fmt: skip
    traces = [json.loads(line) for line in (folder / "traces.jsonl").read_text().splitlines()]
    return traces, json.loads((folder / "counts.json").read_text())


GATE = Stage(
    "gate", gate_round, after=("quantize",),
    inputs=lambda ctx: {**ctx.held_out_inputs(), "teacher": ctx.teacher_settings(),
                        "gate": ctx.spec.quality_gate.model_dump(),
                        "max_tokens": serving_max_tokens(ctx)},
    applies=lambda ctx: ctx.round is not None, report=print_gate,
)  # fmt: skip
WRITE = Stage(
    "write", write_traces, after=("gate", "traces"),
    inputs=lambda ctx: {**ctx.held_out_inputs(), "teacher": ctx.teacher_settings(),
                        "traces_per_round": ctx.spec.loop.traces_per_round,
                        "round": ctx.round.number if ctx.round else None},
    folder="written",
)  # fmt: skip
