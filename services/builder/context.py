"""What every build stage reads: the spec, the user's program, the data, the metric, the
student, and the folders and keys of the stages that have finished."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from rich.console import Console

from services.builder.data import (
    REASONING,
    file_sha256,
    label_fields,
    labelled,
    load_examples,
    load_grouped,
    normalize,
    resolve_metric,
    split_by_group,
)
from services.builder.spec import BuildSpec, SpecError, import_object
from services.builder.student import StudentSource, resolve_student
from services.core.program import ProgramSpec, PromptCodec


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


@dataclass
class BuildContext:
    spec: BuildSpec
    console: Console
    program: Any
    program_spec: ProgramSpec
    trainset: list[Any]
    calibset: list[Any]  # held out: the router's threshold is chosen here
    testset: list[Any]  # held out: touched once per build, for the report
    metric: Any
    threshold: float
    student: StudentSource
    dirs: dict[str, Path] = field(default_factory=dict)  # finished stage -> its folder
    keys: dict[str, str] = field(default_factory=dict)  # finished stage -> its key

    @classmethod
    def load(cls, spec: BuildSpec, console: Console) -> BuildContext:
        """Read and check everything the stages need before any of them runs."""
        program, predictor = load_program(spec.program)
        program_spec = ProgramSpec.from_signature(predictor.signature, name=spec.name)
        codec = PromptCodec(program_spec)
        inputs, outputs = codec.input_names, codec.output_names
        trainset = load_examples(spec.data.train, inputs, outputs, "data.train")
        calibset, testset = held_out(spec, inputs, outputs)
        if (
            REASONING in outputs
            and spec.teacher.is_gold
            and any(REASONING not in e for e in trainset)
        ):
            raise SpecError(
                f"teacher: gold has no {REASONING!r} to teach (the program is a ChainOfThought "
                f"and {spec.data.train} does not label it); use an API teacher (teacher.model) "
                f"or add a {REASONING!r} field to every training row"
            )
        threshold = spec.metric_threshold
        if threshold is None:
            threshold = 1.0 if spec.metric == "exact_match" else 0.5
        return cls(
            spec=spec, console=console, program=program, program_spec=program_spec,
            trainset=trainset, calibset=calibset, testset=testset,
            metric=resolve_metric(spec.metric, judge_spec(spec)),
            threshold=threshold, student=resolve_student(spec.student.source),
        )  # fmt: skip

    @cached_property
    def codec(self) -> PromptCodec:
        return PromptCodec(self.program_spec)

    @cached_property
    def label_names(self) -> list[str]:
        """The output fields that are labels (few distinct values in train), not free text."""
        return label_fields(self.trainset, labelled(self.codec.output_names))

    @cached_property
    def dataset_hashes(self) -> dict[str, str]:
        data = self.spec.data
        files = {"train": data.train, "dev": data.dev, "test": data.test}
        return {key: file_sha256(path) for key, path in files.items() if path is not None}

    def task_inputs(self) -> dict[str, Any]:
        """What the task is: program, train data, metric and its threshold (the traces' key;
        held-out data is not in it, so editing dev rows never retrains)."""
        return {
            "program": self.program_spec.model_dump(),
            "train": self.dataset_hashes["train"],
            "metric": self.spec.metric,
            "metric_lm": self.spec.metric_lm.model_dump() if self.spec.metric_lm else None,
            "threshold": self.threshold,
        }

    def held_out_inputs(self) -> dict[str, Any]:
        """What the evaluation sees: the held-out files and how they are split."""
        return {
            **self.task_inputs(),
            **self.dataset_hashes,
            "calibration_fraction": self.spec.data.calibration_fraction,
            "split": "groups, stratified by the label fields' values",
            "seed": self.spec.seed,
        }

    def teacher_settings(self) -> dict[str, Any]:
        return self.spec.teacher.model_dump(exclude={"num_threads"})

    @property
    def base_gguf(self) -> Path:
        """The student's GGUF before tuning: given, or converted from Hugging Face weights."""
        if self.student.gguf is not None:
            return self.student.gguf
        return self.dirs["convert"] / "base.F16.gguf"

    @cached_property
    def base_gguf_sha256(self) -> str:
        return file_sha256(self.base_gguf)

    @property
    def default_quant(self) -> str:
        return self.spec.quantizations[0]

    @property
    def ggufs(self) -> dict[str, Path]:
        """The quantized files, the default first."""
        folder = self.dirs["quantize"]
        return {q: folder / f"{self.spec.name}.{q}.gguf" for q in self.spec.quantizations}

    def read_json(self, stage: str, name: str) -> Any:
        return json.loads((self.dirs[stage] / name).read_text())

    def verdict(self) -> dict[str, Any] | None:
        """The quality gate on the default quantization (None before evaluation)."""
        if "evaluate" not in self.dirs:
            return None
        return gate(self.read_json("evaluate", "eval.json"), self.spec, self.default_quant)


def held_out(spec: BuildSpec, inputs: list[str], outputs: list[str]) -> tuple[list[Any], list[Any]]:
    """The calibration and test parts: data.dev split by group, or data.dev and data.test."""
    dev, groups = load_grouped(spec.data.dev, inputs, outputs, "data.dev")
    if spec.data.test is not None:
        return dev, load_examples(spec.data.test, inputs, outputs, "data.test")
    # Stratified by the label fields' values together, so both parts keep the label mix.
    labels = label_fields(dev, labelled(outputs))
    strata = [" | ".join(normalize(e[name]) for name in labels) for e in dev]
    calibration, test = split_by_group(groups, spec.data.calibration_fraction, spec.seed, strata)
    if not calibration or not test:
        raise SpecError(
            f"data.dev: {len(dev)} rows in {len(set(groups))} groups cannot be split into a "
            "calibration and a test part; add held-out rows or name data.test"
        )
    return [dev[i] for i in calibration], [dev[i] for i in test]


def judge_spec(spec: BuildSpec) -> Any:
    """The LM judging an LM-judged metric: metric_lm, else an API teacher."""
    if spec.metric != "semantic_f1":
        return None
    if spec.metric_lm is not None:
        return spec.metric_lm
    if spec.teacher.is_gold:
        raise SpecError(
            "metric: semantic_f1 is judged by an LM; set metric_lm (model, api_base, "
            "api_key_env) or an API teacher (teacher.model)"
        )
    return spec.teacher


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
