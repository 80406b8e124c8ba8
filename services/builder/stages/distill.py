"""Stages 1–5: teacher traces, the chat dataset, the student checkpoint, the LoRA fine-tune,
the GGUF export and its quantizations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from services.builder import export, finetune, teacher
from services.builder.context import BuildContext
from services.builder.data import file_sha256
from services.builder.stages.base import Stage, progress_bar
from services.builder.student import convert_hf_folder, dense_hf_copy


def collect_traces(ctx: BuildContext, out: Path) -> None:
    """The teacher's answers on the train set that pass the metric."""
    spec = ctx.spec
    with progress_bar(ctx.console) as bar:
        task = bar.add_task("teacher", total=len(ctx.trainset), note=spec.teacher.model)
        counts = teacher.collect_traces(
            program=ctx.program, teacher=spec.teacher, trainset=ctx.trainset, metric=ctx.metric,
            threshold=ctx.threshold, output_names=ctx.codec.output_names, out_dir=out,
            progress=lambda n: bar.advance(task, n),
        )  # fmt: skip
    ctx.console.print(
        f"  kept {counts.kept}, rejected {counts.rejected}, failed {counts.failed} "
        f"of {counts.total}"
    )


def format_dataset(ctx: BuildContext, out: Path) -> None:
    """Chat-format JSONL, formatted exactly as the runtime will prompt."""
    traces = (ctx.dirs["traces"] / "traces.jsonl").read_text().splitlines()
    with (out / "dataset.jsonl").open("w") as handle:
        for line in traces:
            trace = json.loads(line)
            record = ctx.codec.format_finetune(trace["inputs"], trace["outputs"])
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def hf_folder_hashes(ctx: BuildContext) -> dict[str, Any]:
    hf_dir = ctx.student.hf_dir
    assert hf_dir is not None
    files = {str(f.relative_to(hf_dir)): file_sha256(f) for f in sorted(hf_dir.rglob("*"))
             if f.is_file() and ".cache" not in f.parts}  # fmt: skip
    return {"source": ctx.student.description, "files": files}


def convert_student(ctx: BuildContext, out: Path) -> None:
    """A Hugging Face student without a GGUF, converted by llama.cpp (the export writes into
    that layout, and it is the untuned baseline)."""
    assert ctx.student.hf_dir is not None
    convert_hf_folder(ctx.student.hf_dir, out / "base.F16.gguf")


def given_gguf(ctx: BuildContext) -> dict[str, Any]:
    """The student's source and, when it is a GGUF, that file's hash (a converted one is
    covered by the convert stage's key)."""
    given = ctx.student.gguf is not None
    return {"source": ctx.student.description, "gguf": ctx.base_gguf_sha256 if given else None}


def train_lora(ctx: BuildContext, out: Path) -> None:
    """LoRA on the dense student, loss on the assistant's tokens."""
    spec, console = ctx.spec, ctx.console
    traces = len((ctx.dirs["dataset"] / "dataset.jsonl").read_text().splitlines())
    examples = min(traces, spec.lora.max_examples or traces)
    console.print(f"  {examples} examples, {finetune.optimizer_steps(examples, spec.lora)} "
                  "optimizer steps")  # fmt: skip
    warning = finetune.steps_warning(examples, spec.lora)
    if warning:
        console.print(f"  [yellow]warning:[/] {warning}", highlight=False)
    with progress_bar(console) as bar:
        task = bar.add_task("LoRA", total=None, note="")

        def step(done: int, total: int, loss: float) -> None:
            bar.update(task, completed=done, total=total, note=f"loss {loss:.3f}")
            if not console.is_terminal and (done == total or done % max(1, total // 10) == 0):
                console.print(f"  step {done}/{total} loss {loss:.3f}")  # for CI logs

        summary = finetune.train_lora(
            base_dir=ctx.dirs["student"], dataset_path=ctx.dirs["dataset"] / "dataset.jsonl",
            lora=spec.lora, device=spec.device, seed=spec.seed, n_threads=spec.n_threads,
            out_dir=out, progress=step,
        )  # fmt: skip
    console.print(
        f"  {summary['examples']} examples, {summary['steps']} steps on {summary['device']}, "
        f"{summary['tokens_per_second']} tokens/s, final loss {summary['final_loss']:.3f}"
    )


def export_gguf(ctx: BuildContext, out: Path) -> None:
    """Merged weights -> F16 GGUF in the base's layout, checked against transformers."""
    merged = finetune.merge_adapter(ctx.dirs["student"], ctx.dirs["finetune"] / "adapter")
    gguf_path = out / f"{ctx.spec.name}.F16.gguf"
    export.write_gguf(merged, ctx.base_gguf, gguf_path, ctx.spec.name)
    inputs = ctx.codec.input_names
    prompts = [ctx.codec.format_messages({k: str(e[k]) for k in inputs}) for e in ctx.calibset[:3]]
    checks = export.self_check(merged, gguf_path, prompts)
    (out / "self_check.json").write_text(json.dumps(checks, indent=2))
    ctx.console.print(f"  self-check: llama.cpp and transformers agree on {len(checks)} prompts")


def quantize(ctx: BuildContext, out: Path) -> None:
    """Each configured type, with llama.cpp."""
    f16 = ctx.dirs["export"] / f"{ctx.spec.name}.F16.gguf"
    for quant in ctx.spec.quantizations:
        if quant == "F16":
            shutil.copy2(f16, out / f16.name)
            continue
        target = out / f"{ctx.spec.name}.{quant}.gguf"
        export.quantize(f16, target, quant, ctx.spec.n_threads)
        ctx.console.print(f"  {quant}: {target.stat().st_size / 1e6:.1f} MB")


TRACES = Stage(
    "traces", collect_traces,
    inputs=lambda ctx: {**ctx.task_inputs(), "teacher": ctx.teacher_settings()},
)  # fmt: skip
DATASET = Stage("dataset", format_dataset, after=("traces",))
CONVERT = Stage(
    "convert", convert_student, inputs=hf_folder_hashes,
    applies=lambda ctx: ctx.student.gguf is None,
)  # fmt: skip
STUDENT = Stage(
    "student", lambda ctx, out: dense_hf_copy(ctx.student, out),
    after=("convert",), inputs=given_gguf,
)  # fmt: skip
FINETUNE = Stage(
    "finetune", train_lora, after=("dataset", "student"),
    inputs=lambda ctx: {"lora": ctx.spec.lora.model_dump(), "seed": ctx.spec.seed,
                        "device": ctx.spec.device},
)  # fmt: skip
EXPORT = Stage("export", export_gguf, after=("finetune",))
QUANTIZE = Stage(
    "quantize", quantize, after=("export",),
    inputs=lambda ctx: {"quantizations": ctx.spec.quantizations},
)  # fmt: skip
