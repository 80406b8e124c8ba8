"""Stages 1–5: teacher traces, the chat dataset, the student checkpoint, the LoRA fine-tune,
the GGUF export and its quantizations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rich.markup import escape

from services.builder import export, finetune, teacher
from services.builder.context import BuildContext, trace_examples
from services.builder.data import (
    file_sha256,
    input_key,
    label_counts,
    normalize,
    untaught_labels,
)
from services.builder.harvested import harvested_traces
from services.builder.probe import (
    Probe,
    make_probe,
    make_program_probe,
    sample,
    unformatted_note,
)
from services.builder.stages.base import Stage, progress_bar
from services.builder.student import BASE_GGUF, dense_hf_copy, write_base_gguf
from services.core.gguf_metadata import chat_template
from services.core.harvest import HarvestError, read_harvest
from services.core.program import input_text


def collect_traces(ctx: BuildContext, out: Path) -> None:
    """The teacher's answers on the train set that pass the metric; in a round of the retrain
    loop, on the round's new rows, after the traces the round before carries."""
    rows = ctx.traced_rows
    if rows or ctx.round is None:
        ask_teacher(ctx, out, rows)
    else:  # a round whose new traces the teacher wrote: no train rows to ask about
        for name in ("traces", "rejected", "failed"):
            (out / f"{name}.jsonl").write_text("")
        (out / "counts.json").write_text(json.dumps(
            {"total": 0, "kept": 0, "rejected": 0, "failed": 0}, indent=2))  # fmt: skip
    if ctx.round is not None and ctx.round.carried:
        carry_traces(ctx.round.carried, out)
    elif ctx.spec.traces.added:
        add_harvest(ctx, out)


def ask_teacher(ctx: BuildContext, out: Path, rows: list[Any]) -> None:
    spec = ctx.spec
    raised = len(ctx.metric.errors)
    with progress_bar(ctx.console) as bar:
        task = bar.add_task("teacher", total=len(rows), note=spec.teacher.model)
        counts = teacher.collect_traces(
            program=ctx.program, teacher=spec.teacher, trainset=rows, metric=ctx.metric,
            threshold=ctx.threshold, output_names=ctx.output_names, out_dir=out,
            runner=ctx.runner if ctx.pipeline else None, progress=lambda n: bar.advance(task, n),
        )  # fmt: skip
    ctx.console.print(
        f"  kept {counts.kept}, rejected {counts.rejected}, failed {counts.failed} "
        f"of {counts.total}"
    )
    ctx.metric_errors_since(raised, "teacher answers")
    per_predictor = json.loads((out / "counts.json").read_text()).get("predictors", {})
    for name, calls in per_predictor.items():
        ctx.console.print(f"  {name}: {calls['kept']} calls kept, {calls['rejected']} rejected")


def report_traces(ctx: BuildContext, folder: Path) -> None:
    """A label of the rows asked that no kept trace gives: the student cannot learn it."""
    lines = (folder / "traces.jsonl").read_text().splitlines()
    outputs = [json.loads(line)["outputs"] for line in lines]
    for name in ctx.label_names:
        warning = untaught_labels(label_counts(outputs, name), label_counts(ctx.traced_rows, name))
        if warning:
            ctx.console.print(f"  [yellow]warning:[/] {name}: {escape(warning)}", highlight=False)


def carry_traces(carried: list[Path], out: Path) -> None:
    """The earlier rounds' traces first, then this round's; the harvest's record of what the
    edge answered goes along (the report's before and after)."""
    traces = out / "traces.jsonl"
    lines = [line for path in carried for line in path.read_text().splitlines()]
    lines += traces.read_text().splitlines()
    traces.write_text("".join(line + "\n" for line in lines))
    counts = json.loads((out / "counts.json").read_text())
    counts["carried"] = len(lines) - counts["kept"]
    (out / "counts.json").write_text(json.dumps(counts, indent=2))
    for name in ("harvest.jsonl", "harvest.json"):
        earlier = carried[0].parent / name
        if earlier.is_file():
            shutil.copy2(earlier, out / name)


def add_harvest(ctx: BuildContext, out: Path) -> None:
    """The API's answers from edge harvests, appended to the teacher's traces; never an input
    of the held-out data. harvest.jsonl keeps what the edge answered, for the report."""
    if ctx.pipeline:
        raise HarvestError(
            "traces.added: a harvest holds the program's final answers, which cannot train "
            "the calls of a multi-step program; add its inputs to data.train with an API "
            "teacher instead"
        )
    spec = ctx.spec.traces
    records = [r for path in spec.added for r in read_harvest(path, spec.public_key)]
    traces_path = out / "traces.jsonl"
    taken = {input_key(json.loads(line)["inputs"]) for line in traces_path.read_text().splitlines()}
    try:
        kept, counts = harvested_traces(
            records, input_names=ctx.input_names, output_names=ctx.output_names,
            held_out=ctx.held_out_keys,
            taken=taken, labelled={input_key(dict(e.inputs())): e for e in ctx.trainset},
            metric=ctx.metric, threshold=ctx.threshold,
        )  # fmt: skip
    except ValueError as err:
        raise HarvestError(f"traces.added: {err}") from None
    with traces_path.open("a") as handle:
        for trace in kept:
            handle.write(json.dumps({"inputs": trace["inputs"], "outputs": trace["outputs"],
                                     "source": "harvest"}, ensure_ascii=False) + "\n")  # fmt: skip
    (out / "harvest.jsonl").write_text("".join(json.dumps(t) + "\n" for t in kept))
    (out / "harvest.json").write_text(json.dumps(counts, indent=2))
    dropped = ", ".join(f"{why.replace('_', ' ')} {n}" for why, n in counts.items()
                        if why not in ("records", "kept"))  # fmt: skip
    ctx.console.print(f"  harvest: {counts['kept']} of {counts['records']} records kept as "
                      f"traces" + (f" (dropped: {dropped})" if dropped else ""))  # fmt: skip


def trace_records(ctx: BuildContext, trace: dict[str, Any]) -> list[dict[str, Any]]:
    """A kept trace's training records: one per predictor call, formatted with that
    predictor's signature and demos exactly as it is prompted when served."""
    if "calls" not in trace:
        inputs = ctx.codec.decode_inputs(trace["inputs"])  # as the runtime reads the wire's
        return [ctx.codec.format_finetune(inputs, trace["outputs"])]
    codecs = ctx.runner.codecs
    return [codecs[c["predictor"]].format_finetune(c["inputs"], c["outputs"])
            for c in trace["calls"]]  # fmt: skip


def format_dataset(ctx: BuildContext, out: Path) -> None:
    """Chat-format JSONL, formatted exactly as the runtime will prompt."""
    traces = (ctx.dirs["traces"] / "traces.jsonl").read_text().splitlines()
    with (out / "dataset.jsonl").open("w") as handle:
        for line in traces:
            for record in trace_records(ctx, json.loads(line)):
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def hf_folder_hashes(ctx: BuildContext) -> dict[str, Any]:
    hf_dir = ctx.student.hf_dir
    assert hf_dir is not None
    files = {str(f.relative_to(hf_dir)): file_sha256(f) for f in sorted(hf_dir.rglob("*"))
             if f.is_file() and ".cache" not in f.parts}  # fmt: skip
    return {"source": ctx.student.description, "files": files}


def base_inputs(ctx: BuildContext) -> dict[str, Any]:
    """A given GGUF's hash, or the Hugging Face folder's files."""
    if ctx.student.gguf is not None:
        return {"source": ctx.student.description, "gguf": file_sha256(ctx.student.gguf)}
    return hf_folder_hashes(ctx)


def given_gguf(ctx: BuildContext) -> dict[str, Any]:
    """The student's source and, when it is used as given, that file's hash (one the build
    wrote is covered by the convert stage's key)."""
    given = not ctx.student.needs_base_gguf
    return {"source": ctx.student.description, "gguf": ctx.base_gguf_sha256 if given else None}


# Train rows the final model answers for its per-field training accuracy.
TRAIN_PROBE_ROWS = 32


def train_lora(ctx: BuildContext, out: Path) -> None:
    """LoRA on the dense student, the loss on the answers' values; the checkpoint best on the
    calibration part is kept."""
    spec, console = ctx.spec, ctx.console
    traces = ctx.traces()
    records = len((ctx.dirs["dataset"] / "dataset.jsonl").read_text().splitlines())
    examples = min(records, spec.lora.max_examples or records)  # a multi-step trace: several
    console.print(f"  {examples} examples, {finetune.optimizer_steps(examples, spec.lora)} "
                  "optimizer steps")  # fmt: skip
    warning = finetune.steps_warning(examples, spec.lora)
    if warning:
        console.print(f"  [yellow]warning:[/] {warning}", highlight=False)
    weights = balance_weights(ctx, traces)
    if weights:
        console.print("  balancing: each label combination gets an equal share of every epoch")
    with progress_bar(console) as bar:
        task = bar.add_task("LoRA", total=None, note="")

        def step(done: int, total: int, loss: float) -> None:
            bar.update(task, completed=done, total=total, note=f"loss {loss:.3f}")
            if not console.is_terminal and (done == total or done % max(1, total // 10) == 0):
                console.print(f"  step {done}/{total} loss {loss:.3f}")  # for CI logs

        summary = finetune.train_lora(
            base_dir=ctx.dirs["student"], dataset_path=ctx.dirs["dataset"] / "dataset.jsonl",
            lora=spec.lora, device=spec.device, seed=spec.seed, n_threads=spec.n_threads,
            out_dir=out, probes=training_probes(ctx, traces), sample_weights=weights,
            progress=step, on_probe=lambda point: console.print(
                f"  step {point['step']}: calibration {probe_line(point)}", highlight=False),
        )  # fmt: skip
    console.print(
        f"  {summary['steps']} steps on {summary['device']}, {summary['tokens_per_second']} "
        f"tokens/s, final loss {summary['final_loss']:.3f}; kept step {summary['chosen_step']}"
    )
    if summary["dropped_too_long"]:
        console.print(f"  [yellow]warning:[/] {summary['dropped_too_long']} examples longer than "
                      f"lora.max_length={spec.lora.max_length} tokens were left out; raise "
                      "`lora: {max_length: N}` to train on them", highlight=False)  # fmt: skip
    if summary["train_probe"]:
        console.print(f"  on {summary['train_probe']['n']} train rows: "
                      f"{probe_line(summary['train_probe'])}", highlight=False)  # fmt: skip


def training_probes(ctx: BuildContext, traces: list[dict[str, Any]]) -> finetune.Probes:
    """The calibration part (checkpoint choice) and a sample of the traces (per-field accuracy
    against what the model was taught)."""
    fields = ctx.label_names
    types = ctx.metric.annotations
    taught = trace_examples(sample(traces, TRAIN_PROBE_ROWS, ctx.spec.seed), types)
    use_calibration = bool(ctx.calibset) and ctx.spec.lora.checkpoints > 0

    def probe(name: str, examples: list[Any]) -> Probe:
        if ctx.pipeline:
            return make_program_probe(name, ctx.runner, ctx.metric, examples, fields)
        return make_probe(name, ctx.codec, ctx.metric, examples, fields)

    return finetune.Probes(
        calibration=probe("calibration", ctx.calibset) if use_calibration else None,
        train=probe("train", taught),
    )


def balance_weights(ctx: BuildContext, traces: list[dict[str, Any]]) -> list[float] | None:
    """Per-trace sampling weights when `lora.balance` asks for them."""
    fields = ctx.label_names
    outputs = [t["outputs"] for t in traces]
    counts = {name: label_counts(outputs, name) for name in fields}
    if not finetune.should_balance(ctx.spec.lora.balance, counts):
        return None
    weights = finetune.balanced_weights([tuple(normalize(o[f]) for f in fields) for o in outputs])
    # A multi-step trace is one training record per predictor call, each with its weight.
    return [w for w, t in zip(weights, traces, strict=True) for _ in t.get("calls", [None])]


def probe_line(point: dict[str, Any]) -> str:
    fields = ", ".join(f"{name} {value:.0%}" for name, value in point["fields"].items())
    return (
        f"{point['score']:.1%} of {point['n']}"
        + (f" ({fields})" if fields else "")
        + unformatted_note(point)
    )


def export_gguf(ctx: BuildContext, out: Path) -> None:
    """Merged weights -> F16 GGUF in the base's layout, checked against transformers."""
    if ctx.pipeline:  # predictor prompts as trained
        records = (ctx.dirs["dataset"] / "dataset.jsonl").read_text().splitlines()[:3]
        prompts = [json.loads(r)["messages"][:-1] for r in records]
    else:
        inputs = ctx.codec.input_names
        prompts = [ctx.codec.format_messages({k: input_text(e[k]) for k in inputs})
                   for e in ctx.calibset[:3]]  # fmt: skip
    checks, references = export.export_student(
        ctx.dirs["student"], ctx.dirs["finetune"] / "adapter", ctx.base_gguf,
        out / f"{ctx.spec.name}.F16.gguf", ctx.spec.name, prompts,
    )  # fmt: skip
    export.save_references(references, out / REFERENCES)
    (out / "self_check.json").write_text(json.dumps(checks, indent=2))
    worst = max(c["max_logit_difference"] / c["logit_std"] for c in checks)
    ctx.console.print(
        f"  self-check: llama.cpp and transformers agree on {len(checks)} prompts (greedy "
        f"tokens; every block, and the logits within {worst:.3f} standard deviations)"
    )


# The model's own hidden states and logits on the self-check prompts: every file is held to them.
REFERENCES = "references.npz"


def quantize(ctx: BuildContext, out: Path) -> None:
    """Each configured type, with llama.cpp, each checked against the model within its type's
    bound."""
    f16 = ctx.dirs["export"] / f"{ctx.spec.name}.F16.gguf"
    references = export.load_references(ctx.dirs["export"] / REFERENCES)
    checks = []
    for quant in ctx.spec.quantizations:
        if quant == "F16":
            shutil.copy2(f16, out / f16.name)
            continue
        target = out / f"{ctx.spec.name}.{quant}.gguf"
        fallbacks = export.quantize(f16, target, quant, ctx.spec.n_threads)
        found = [export.compare(ref, target, quant, i) for i, ref in enumerate(references)]
        checks += found
        worst = max(c["max_logit_difference"] / c["logit_std"] for c in found)
        ctx.console.print(f"  {quant}: {target.stat().st_size / 1e6:.1f} MB, logits within "
                          f"{worst:.2f} standard deviations of the model's"
                          + (f"; {fallbacks}" if fallbacks else ""), highlight=False)  # fmt: skip
    (out / "self_check.json").write_text(json.dumps(checks, indent=2))


TRACES = Stage(
    "traces", collect_traces, report=report_traces, kept_when_failed=True,  # failed.jsonl
    inputs=lambda ctx: {**ctx.task_inputs(), "teacher": ctx.teacher_settings(),
                        **({"round": ctx.round.key()} if ctx.round else {}),
                        # held-out inputs decide which harvested records may be used
                        **({"added": [file_sha256(p) for p in ctx.spec.traces.added],
                            "held_out": ctx.held_out_inputs()} if ctx.spec.traces.added else {})},
)  # fmt: skip
DATASET = Stage("dataset", format_dataset, after=("traces",))
# The base GGUF, when the build writes it (see StudentSource.needs_base_gguf).
CONVERT = Stage(
    "convert", lambda ctx, out: write_base_gguf(ctx.student, out / BASE_GGUF),
    inputs=base_inputs, applies=lambda ctx: ctx.student.needs_base_gguf, host_shared=True,
)  # fmt: skip
STUDENT = Stage(
    "student", lambda ctx, out: dense_hf_copy(ctx.student, out, chat_template(ctx.base_gguf)),
    after=("convert",), inputs=given_gguf, host_shared=True,
)  # fmt: skip
FINETUNE = Stage(
    "finetune", train_lora, after=("dataset", "student"),
    # The calibration part chooses the checkpoint: held-out rows are in this key.
    inputs=lambda ctx: {"lora": ctx.spec.lora.model_dump(), "seed": ctx.spec.seed,
                        "device": ctx.spec.device, "held_out": ctx.held_out_inputs()},
)  # fmt: skip
EXPORT = Stage(
    "export", export_gguf, after=("finetune",),
    # The layout's writer and the checks it passes: a file from an older export is redone.
    inputs=lambda ctx: {"layout": "llama.cpp converter", "checks": "blocks, logits, greedy"},
)  # fmt: skip
QUANTIZE = Stage(
    "quantize", quantize, after=("export",),
    inputs=lambda ctx: {"quantizations": ctx.spec.quantizations},
)  # fmt: skip
