"""`edgedistill build SPEC`: the whole build, top to bottom.

Each stage is a plain function writing under BUILD/<stage>/. A stage is skipped on a rerun
when the hash of its inputs and settings (which includes its parents' hashes) is unchanged;
a stage writes into a temporary folder and is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services.builder import calibrate as calibration_stage
from services.builder import evaluate, export, finetune, report, teacher
from services.builder.data import REASONING, file_sha256, load_examples, resolve_metric
from services.builder.package import write_bundle
from services.builder.spec import BuildSpec, SpecError, import_object
from services.builder.student import convert_hf_folder, dense_hf_copy, resolve_student
from services.core.program import ProgramSpec, PromptCodec

STAGE_FILE = ".stage.json"


class QualityGateFailed(RuntimeError):
    """The distilled student kept too little of the teacher's quality."""


@dataclass
class BuildResult:
    bundle: Path
    evaluation: dict[str, Any]
    calibration: dict[str, Any]
    skipped: list[str]
    ran: list[str]
    seconds: float


class Stages:
    """Runs stages with input hashing; records which ran and which were skipped."""

    def __init__(self, root: Path, console: Console) -> None:
        self.root = root
        self.console = console
        self.ran: list[str] = []
        self.skipped: list[str] = []
        root.mkdir(parents=True, exist_ok=True)

    def run(
        self, name: str, inputs: dict[str, Any], work: Callable[[Path], None]
    ) -> tuple[Path, str]:
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
        final = self.root / name
        marker = final / STAGE_FILE
        if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
            self.console.print(f"[dim]• {name}: inputs unchanged, skipped[/]")
            self.skipped.append(name)
            return final, key
        self.console.print(f"[bold]• {name}[/]")
        staging = self.root / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        started = time.perf_counter()
        try:
            work(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # frees the space a full disk needs back
            raise
        seconds = time.perf_counter() - started
        (staging / STAGE_FILE).write_text(json.dumps({"key": key, "seconds": round(seconds, 1)}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        self.console.print(f"  [green]done[/] in {seconds:.1f} s")
        self.ran.append(name)
        return final, key


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("  {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def load_program(path: str) -> tuple[Any, Any]:
    """The user's DSPy module and its one predictor."""
    factory = import_object(path, "program")
    program = factory() if callable(factory) and not hasattr(factory, "predictors") else factory
    if not hasattr(program, "predictors"):
        raise SpecError(f"program: {path} did not return a dspy.Module")
    predictors = program.predictors()
    if len(predictors) != 1:
        raise SpecError(
            f"program: {path} has {len(predictors)} predictors; edgedistill distills and serves "
            "single-predictor programs (dspy.Predict, dspy.ChainOfThought)"
        )
    return program, predictors[0]


def build(spec: BuildSpec, console: Console | None = None) -> BuildResult:
    console = console or Console()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch
    started = time.perf_counter()
    stages = Stages(spec.output, console)

    # The program, its served form, the data and the metric.
    program, predictor = load_program(spec.program)
    program_spec = ProgramSpec.from_signature(predictor.signature, name=spec.name)
    codec = PromptCodec(program_spec)
    inputs, outputs = codec.input_names, codec.output_names
    trainset = load_examples(spec.data.train, inputs, outputs, "data.train")
    devset = load_examples(spec.data.dev, inputs, outputs, "data.dev")
    if REASONING in outputs and spec.teacher.is_gold and any(REASONING not in e for e in trainset):
        raise SpecError(
            f"teacher: gold has no {REASONING!r} to teach (the program is a ChainOfThought and "
            f"{spec.data.train} does not label it); use an API teacher (teacher.model) or add a "
            f"{REASONING!r} field to every training row"
        )
    metric = resolve_metric(spec.metric)
    threshold = spec.metric_threshold
    if threshold is None:
        threshold = 1.0 if spec.metric == "exact_match" else 0.5
    student = resolve_student(spec.student.source)
    base = {
        "program": program_spec.model_dump(),
        "train": file_sha256(spec.data.train),
        "dev": file_sha256(spec.data.dev),
        "metric": spec.metric,
        "threshold": threshold,
    }
    teacher_settings = spec.teacher.model_dump(exclude={"num_threads"})

    # 1. traces: the teacher's answers that pass the metric.
    def traces_work(out: Path) -> None:
        with _progress(console) as bar:
            task = bar.add_task("teacher", total=len(trainset), note=spec.teacher.model)
            counts = teacher.collect_traces(
                program=program, teacher=spec.teacher, trainset=trainset, metric=metric,
                threshold=threshold, output_names=outputs, out_dir=out,
                progress=lambda n: bar.advance(task, n),
            )  # fmt: skip
        console.print(
            f"  kept {counts.kept}, rejected {counts.rejected}, failed {counts.failed} "
            f"of {counts.total}"
        )

    traces_dir, traces_key = stages.run(
        "traces", {**base, "teacher": teacher_settings}, traces_work
    )

    # 2. dataset: chat-format JSONL, formatted exactly as the runtime will prompt.
    def dataset_work(out: Path) -> None:
        with (out / "dataset.jsonl").open("w") as handle:
            for line in (traces_dir / "traces.jsonl").read_text().splitlines():
                trace = json.loads(line)
                record = codec.format_finetune(trace["inputs"], trace["outputs"])
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    dataset_dir, dataset_key = stages.run("dataset", {"traces": traces_key}, dataset_work)

    # A Hugging Face student without a GGUF: llama.cpp converts it (the export writes into
    # that layout, and it is the untuned baseline).
    if student.gguf is not None:
        base_gguf, base_key = student.gguf, file_sha256(student.gguf)
    else:
        hf_dir = student.hf_dir
        assert hf_dir is not None
        folder = {str(f.relative_to(hf_dir)): file_sha256(f) for f in sorted(hf_dir.rglob("*"))
                  if f.is_file() and ".cache" not in f.parts}  # fmt: skip
        convert_dir, base_key = stages.run(
            "convert",
            {"source": student.description, "files": folder},
            lambda out: convert_hf_folder(hf_dir, out / "base.F16.gguf"),
        )
        base_gguf = convert_dir / "base.F16.gguf"

    # The student as a dense transformers checkpoint (dequantized once).
    student_dir, student_key = stages.run(
        "student",
        {"source": student.description, "gguf": base_key},
        lambda out: dense_hf_copy(student, out),
    )

    # 3. finetune: LoRA, loss on the assistant's tokens.
    def finetune_work(out: Path) -> None:
        with _progress(console) as bar:
            task = bar.add_task("LoRA", total=None, note="")

            def step(done: int, total: int, loss: float) -> None:
                bar.update(task, completed=done, total=total, note=f"loss {loss:.3f}")
                if not console.is_terminal and (done == total or done % max(1, total // 10) == 0):
                    console.print(f"  step {done}/{total} loss {loss:.3f}")  # for CI logs

            summary = finetune.train_lora(
                base_dir=student_dir, dataset_path=dataset_dir / "dataset.jsonl", lora=spec.lora,
                device=spec.device, seed=spec.seed, n_threads=spec.n_threads, out_dir=out,
                progress=step,
            )  # fmt: skip
        console.print(
            f"  {summary['examples']} examples, {summary['steps']} steps on {summary['device']}, "
            f"{summary['tokens_per_second']} tokens/s, final loss {summary['final_loss']:.3f}"
        )

    finetune_dir, finetune_key = stages.run(
        "finetune",
        {"dataset": dataset_key, "student": student_key, "lora": spec.lora.model_dump(),
         "seed": spec.seed, "device": spec.device},
        finetune_work,
    )  # fmt: skip

    # 4. export: merged weights -> F16 GGUF, checked against transformers.
    def export_work(out: Path) -> None:
        merged = finetune.merge_adapter(student_dir, finetune_dir / "adapter")
        gguf_path = out / f"{spec.name}.F16.gguf"
        export.write_gguf(merged, base_gguf, gguf_path, spec.name)
        prompts = [codec.format_messages({k: str(e[k]) for k in inputs}) for e in devset[:3]]
        checks = export.self_check(merged, gguf_path, prompts)
        (out / "self_check.json").write_text(json.dumps(checks, indent=2))
        console.print(f"  self-check: llama.cpp and transformers agree on {len(checks)} prompts")

    export_dir, export_key = stages.run("export", {"finetune": finetune_key}, export_work)
    f16 = export_dir / f"{spec.name}.F16.gguf"

    # 5. quantize with llama.cpp.
    def quantize_work(out: Path) -> None:
        for quant in spec.quantizations:
            if quant == "F16":
                shutil.copy2(f16, out / f16.name)
                continue
            export.quantize(f16, out / f"{spec.name}.{quant}.gguf", quant, spec.n_threads)
            size = (out / f"{spec.name}.{quant}.gguf").stat().st_size / 1e6
            console.print(f"  {quant}: {size:.1f} MB")

    quant_dir, quant_key = stages.run(
        "quantize", {"export": export_key, "quantizations": spec.quantizations}, quantize_work
    )
    ggufs = {q: quant_dir / f"{spec.name}.{q}.gguf" for q in spec.quantizations}

    # 6. evaluate on the held-out dev set.
    def evaluate_work(out: Path) -> None:
        program_path = out / "program.json"
        program_spec.save(program_path)
        dev_rows = [dict(e.items()) for e in devset]
        common = {
            "program_path": program_path, "dev_rows": dev_rows, "input_names": inputs,
            "metric_name": spec.metric, "max_tokens": spec.eval_max_tokens,
            "n_threads": spec.n_threads,
        }  # fmt: skip
        targets = [(f"untuned student ({student_label(base_gguf)})", base_gguf)]
        targets += [(f"distilled {q}", path) for q, path in ggufs.items()]
        with _progress(console) as bar:
            task = bar.add_task("evaluate", total=len(targets) + 1, note="teacher")
            teacher_result = evaluate.evaluate_teacher(
                program=program, teacher=spec.teacher, devset=devset, metric=metric,
                output_names=outputs,
            )  # fmt: skip
            bar.advance(task)
            results = []
            for label, path in targets:
                bar.update(task, note=label)
                results.append(evaluate.evaluate_gguf(label=label, gguf_path=path, **common))  # type: ignore[arg-type]
                bar.advance(task)
        evaluation = {
            "name": spec.name,
            "dev_examples": len(devset),
            "metric": spec.metric,
            "teacher": teacher_result,
            "students": results,
        }
        evaluate.write_eval(out / "eval.json", evaluation)

    eval_dir, eval_key = stages.run(
        "evaluate",
        {"quantize": quant_key, **base, "teacher": teacher_settings,
         "max_tokens": spec.eval_max_tokens},
        evaluate_work,
    )  # fmt: skip
    evaluation = json.loads((eval_dir / "eval.json").read_text())

    # 7. calibrate the router on the default (first) quantization.
    default_quant = spec.quantizations[0]

    def calibrate_work(out: Path) -> None:
        variant = next(
            s for s in evaluation["students"] if s["label"] == f"distilled {default_quant}"
        )
        result = calibration_stage.calibrate(
            variant["examples"], evaluation["teacher"]["examples"],
            target_retention=spec.router.target_retention, variant=default_quant,
        )  # fmt: skip
        (out / "calibration.json").write_text(json.dumps(result, indent=2))
        shutil.copy2(eval_dir / "eval.json", out / "eval.json")
        report.write_reports(evaluation, result, out)

    calib_dir, calib_key = stages.run(
        "calibrate", {"evaluate": eval_key, "router": spec.router.model_dump()}, calibrate_work
    )
    calibration = json.loads((calib_dir / "calibration.json").read_text())
    report.print_table(evaluation, console)
    console.print(
        f"router: threshold {calibration['threshold']:.4f} sends {calibration['fallback_rate']:.1%}"
        f" to the teacher for {calibration['system_quality']:.1%} quality"
    )

    # 8. bundle: everything the runtime and router need, verifiable.
    bundle_dir = spec.output / "bundle"
    version = spec.version or datetime.now(UTC).strftime("%Y.%m.%d-%H%M%S")

    def bundle_work(out: Path) -> None:
        manifest = write_bundle(
            destination=bundle_dir,
            name=spec.name,
            version=version,
            ggufs=ggufs,
            program=program_spec,
            chat_template=_chat_template(base_gguf),
            evaluation_dir=calib_dir,
            calibration=calibration,
            provenance={
                "base_model": {"source": student.description, "sha256": file_sha256(base_gguf)},
                "teacher": spec.teacher.model,
                "datasets": {"train": base["train"], "dev": base["dev"]},
                "metric": spec.metric,
                "traces": json.loads((traces_dir / "counts.json").read_text()),
                "quality_gate": gate(evaluation, spec, default_quant),
            },
        )
        (out / "bundle.json").write_text(
            json.dumps({"path": str(bundle_dir), "version": manifest.version})
        )

    if not (bundle_dir / "manifest.json").is_file():  # deleted since: package again
        shutil.rmtree(spec.output / "package", ignore_errors=True)
    stages.run(  # the stage's own folder is "package"; the bundle itself is BUILD/bundle
        "package", {"calibrate": calib_key, "version": spec.version}, bundle_work
    )
    console.print(f"bundle: {bundle_dir}")
    result = BuildResult(
        bundle=bundle_dir, evaluation=evaluation, calibration=calibration,
        skipped=stages.skipped, ran=stages.ran, seconds=time.perf_counter() - started,
    )  # fmt: skip
    verdict = gate(evaluation, spec, default_quant)
    if not verdict["passed"]:
        raise QualityGateFailed(
            f"quality gate: distilled {default_quant} keeps {verdict['retention']:.0%} of the "
            "teacher's quality, under quality_gate.min_retention="
            f"{spec.quality_gate.min_retention:.0%}. "
            "Artifacts are kept in the build folder. To improve: add traces (more or more varied "
            "train examples, an API teacher), use a larger student, or serve in hybrid mode with "
            "the router so low-confidence requests go to the teacher."
        )
    return result


def gate(evaluation: dict[str, Any], spec: BuildSpec, quant: str) -> dict[str, Any]:
    teacher_score = evaluation["teacher"]["score"]
    student_score = next(
        s["score"] for s in evaluation["students"] if s["label"] == f"distilled {quant}"
    )
    retention = student_score / teacher_score if teacher_score else 0.0
    return {
        "retention": retention,
        "min_retention": spec.quality_gate.min_retention,
        "passed": retention >= spec.quality_gate.min_retention,
    }


def student_label(gguf_path: Path) -> str:
    from services.runtime.backends._llamacpp import quantization_name, read_gguf_metadata

    return quantization_name(read_gguf_metadata(gguf_path))


def _chat_template(gguf_path: Path) -> str:
    from services.runtime.backends._llamacpp import read_gguf_metadata

    return str(read_gguf_metadata(gguf_path).get("tokenizer.chat_template", ""))
