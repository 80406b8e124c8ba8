"""What every build stage reads: the spec, the user's program, the data, the metric, the
student, and the folders and keys of the stages that have finished."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import Any, get_args

from pydantic.fields import FieldInfo
from rich.console import Console
from rich.markup import escape

from services.builder import decision
from services.builder.data import (
    REASONING,
    check_values,
    choice_fields,
    file_sha256,
    input_key,
    label_fields,
    labelled,
    load_examples,
    load_grouped,
    normalize,
    parses,
    split_by_group,
    unreasoned_rows,
)
from services.builder.metrics import (
    BUILTIN_METRICS,
    TypedMetric,
    check_metric,
    resolve_metric,
)
from services.builder.program_files import program_files, recording_reads
from services.builder.requirements import program_requirements
from services.builder.spec import (
    IMPORT_ROOTS,
    BuildSpec,
    SpecError,
    import_object,
    user_code_location,
)
from services.builder.student import BASE_GGUF, StudentSource, resolve_student
from services.core.pipeline import (
    PipelineSpec,
    ProgramRunner,
    SourceSpec,
    UnboundPredictor,
    forward_annotations,
    forward_defaults,
    forward_inputs,
    local_sources,
    make_module,
    predictor_specs,
)
from services.core.program import (
    FieldSpec,
    ProgramFormatError,
    ProgramSpec,
    PromptCodec,
    as_history,
    blank_as_none,
    optional_inner,
    output_annotations,
    typed_value,
)


def load_program(path: str) -> Any:
    """The user's DSPy module (one predictor or many)."""
    factory = import_object(path, "program")
    try:
        return make_module(factory)
    except ProgramFormatError as err:
        raise SpecError(f"program: {path}: {err}") from None
    except Exception as err:  # the user's factory failed: say where, not our stack
        raise SpecError(
            f"program: {path} raised {type(err).__name__}: {err}"
            + (_needs_arguments(factory, err) or user_code_location(err))
        ) from err


def _needs_arguments(factory: Any, err: Exception) -> str | None:
    """The fix when `program:` names a class whose __init__ takes arguments."""
    if not isinstance(factory, type) or not isinstance(err, TypeError):
        return None
    name = factory.__qualname__
    if not str(err).startswith(f"{name}.__init__() missing"):  # not an error inside __init__
        return None
    return (
        "; the build calls it with no arguments: name a function that makes it, e.g. "
        f"`def make(): return {name}(...)`"
    )


def check_text_fields(path: str, program: Any) -> None:
    """Every field is one a text model can read and write: a `dspy.Image`, `Audio` or `File`
    (also inside a list) is content no student here takes, refused before anything runs."""
    import dspy
    from dspy.adapters.utils import get_annotation_name

    media = (dspy.Image, dspy.Audio, dspy.File)

    def holds_media(annotation: Any) -> bool:
        if isinstance(annotation, type) and issubclass(annotation, media):
            return True
        return any(holds_media(arg) for arg in get_args(annotation))

    for name, predictor in program.named_predictors():
        for field_name, info in predictor.signature.fields.items():
            if holds_media(info.annotation):
                owner = "" if name == "self" else f"{name}'s "
                raise SpecError(
                    f"program: {path}: {owner}field {field_name!r} is "
                    f"{get_annotation_name(info.annotation)}: the students are text models; "
                    "give the program a text field instead (a caption, a transcript, the text)"
                )


def runs_own_code(program: Any) -> bool:
    """A module of the author's own whose `forward` names its inputs: the Python around its
    one call (inputs joined, an answer normalised) is part of the program, so it is shipped
    and run like a multi-step program's. DSPy's own modules (Predict, ChainOfThought) are
    served from their signature alone."""
    return not type(program).__module__.startswith("dspy") and bool(forward_inputs(program))


def served_as_its_predictor(program: Any) -> str | None:
    """A module around one predictor that is served as that predictor (DSPy's Refine or
    BestOfN, a `forward(**kwargs)` wrapper): what the module adds around the call runs for the
    teacher but is not served, which its author should read before shipping."""
    import dspy

    if isinstance(program, dspy.Predict) or type(program) is dspy.ChainOfThought:
        return None
    name = type(program).__name__
    return (
        f"program: {name} around one predictor: the teacher runs it as written, the student "
        f"learns the predictor's answer and serves one call of it per request ({name}'s own "
        "Python around that call, its retries or its choice among attempts, is not served; "
        "the router sends low-confidence answers to the API)"
    )


def describe_predictor(spec: BuildSpec, predictor: Any) -> ProgramSpec:
    """A single-predictor program's program.json: its signature, which the runtime rebuilds
    from this description alone."""
    demos = [dict(d.items()) for d in predictor.demos]  # trained with, as served with
    try:
        return ProgramSpec.from_signature(
            predictor.signature, name=spec.name, demos=demos, prompt_format=spec.prompt_format
        )
    except ProgramFormatError as err:
        raise SpecError(f"program: {spec.program}: {err}") from None


def say_what_ships(pipeline: PipelineSpec, sources: dict[str, Path], console: Console) -> None:
    """The files and packages a program's code needs where it is served, beside its code."""
    data = sorted(rel for rel in sources if not rel.endswith(".py"))
    if data:
        console.print(f"  program: ships {', '.join(data)} with its code (read as it was "
                      "imported and made)", highlight=False)  # fmt: skip
    if pipeline.requires:
        console.print(f"  program: its code imports {', '.join(pipeline.requires)}, beyond "
                      "what edgedistill serves with: the images build-bundle makes install "
                      "it; a host of your own needs it beside edgedistill",
                      highlight=False)  # fmt: skip


def describe_pipeline(
    spec: BuildSpec, module: Any, trainset_row: dict[str, Any], reads: set[str]
) -> tuple[PipelineSpec, dict[str, Path]]:
    """A multi-step program's program.json and the files that go with it: its source and the
    files its import and factory read (`reads`).

    Inputs are `forward`'s parameters; outputs, the predictors' output fields that the train
    rows label and the final prediction carries (a gold teacher needs every predictor's
    fields labelled, so one gold run tells the intermediate ones apart)."""
    path, name = spec.program, spec.name
    inputs = forward_inputs(module)
    defaults = forward_defaults(module)
    if not inputs:
        raise SpecError(
            f"program: {path}: its forward takes no named inputs; write them as parameters "
            "(def forward(self, ticket: str)) so requests can be checked against them"
        )
    predictors = [
        p.model_copy(update={"prompt_format": spec.prompt_format}) for p in predictor_specs(module)
    ]
    fields = {f.name: f for p in predictors for f in p.inputs + p.outputs}
    annotated = forward_annotations(module)
    for param in inputs:  # a parameter no predictor takes (`max_words: int`): typed by forward
        if param not in fields and param in annotated:
            fields[param] = FieldSpec.describe(param, FieldInfo(annotation=annotated[param]), False)
    produced = [f.name for p in predictors for f in p.outputs if f.name != REASONING]
    outputs = [n for i, n in enumerate(produced) if n in trainset_row and n not in produced[:i]]
    if not outputs:
        raise SpecError(
            f"program: {path}: the train rows label none of its predictors' output fields "
            f"({', '.join(dict.fromkeys(produced))}); label the program's final outputs"
        )
    module_name, _, attr = path.partition(":")
    sources = program_files(reads, IMPORT_ROOTS)
    for code in [module_name, *defining_modules(module)]:
        sources |= local_sources(code, IMPORT_ROOTS)
    pipeline = PipelineSpec(
        name=name, instructions=(type(module).__doc__ or "").strip(),
        inputs=[fields.get(n, FieldSpec(name=n)).model_copy(update={"required": n not in defaults})
                for n in inputs],
        outputs=[fields[n] for n in outputs], predictors=predictors,
        source=SourceSpec(module=module_name, attr=attr, files=sorted(sources)),
        prompt_format=spec.prompt_format, requires=program_requirements(sources),
    )  # fmt: skip
    if spec.teacher.is_gold:
        pipeline = without_intermediate_fields(pipeline, module, trainset_row, path)
    return pipeline, sources


def defining_modules(module: Any) -> list[str]:
    """The modules that define the program's classes and signatures: where a program unpickled
    by `dspy.load` (which imports them by name) or made through importlib is written."""
    modules = [type(sub).__module__ for _, sub in module.named_sub_modules()]
    modules += [p.signature.__module__ for p in module.predictors()]
    return list(dict.fromkeys(modules))


def gold_forward(runner: ProgramRunner, row: dict[str, Any]) -> tuple[Any, Any] | None:
    """The program's forward on one row, each predictor call answered from the row's labels:
    its prediction and the calls it made; None when that run cannot be made (a label missing
    or one its predictor's answer cannot hold, or the program's own error, which the teacher
    stage runs into again and reports)."""
    from services.builder.teacher import gold_answers

    inputs = {name: row[name] for name in runner.spec.input_names if name in row}
    try:
        prediction, run = runner.forward(inputs, gold_answers(runner, row))
    except UnboundPredictor as err:  # no teacher could make it servable
        raise SpecError(f"program: {runner.spec.source.module}: {err}") from None
    except Exception:
        return None
    return None if prediction is None else (prediction, run)


def without_intermediate_fields(
    pipeline: PipelineSpec, module: Any, row: dict[str, Any], path: str
) -> PipelineSpec:
    """The program's outputs less the labelled fields its final prediction does not carry
    (a predictor's answer the next step reads), found by one gold run of the first row."""
    if any(f.name not in row for p in pipeline.predictors for f in p.outputs):
        return pipeline  # not every call labelled: check_gold_labels names what is missing
    ran = gold_forward(ProgramRunner(module.deepcopy(), pipeline), row)
    if ran is None:
        return pipeline
    prediction, _ = ran
    carried = [f for f in pipeline.outputs if f.name in prediction]  # None is a value too
    if not carried:
        raise SpecError(
            f"program: {path}: its forward's prediction carries none of the labelled fields "
            f"({', '.join(pipeline.output_names)}); return them in a dspy.Prediction"
        )
    return pipeline.model_copy(update={"outputs": carried})


def check_data_values(
    spec: BuildSpec, types: dict[str, Any], inputs: Sequence[FieldSpec] = (),
    unanswered: Callable[[dict[str, Any]], Collection[str]] = lambda row: (),
) -> None:  # fmt: skip
    """Every data file's labels, by the types of the fields the program's predictors produce
    (a multi-step program's intermediate labels too, but where no predictor answers them), and
    its typed inputs."""
    files = {"data.train": spec.data.train, "data.dev": spec.data.dev, "data.test": spec.data.test}
    for key, path in files.items():
        if path is not None:
            check_values(path, key, types, inputs, unanswered)


def unanswered_fields(pipeline: PipelineSpec, module: Any) -> Callable[[dict[str, Any]], set[str]]:
    """A row's output fields that no predictor answers when the program runs on it, each call
    answered from the row's labels: the program's Python writes them (`team="none"` on a branch
    that never asks the router). Nothing when that run cannot be made (a label missing)."""
    produced = {p.name: {f.name for f in p.outputs} for p in pipeline.predictors}

    @cache
    def runner() -> ProgramRunner:  # a copy of the module, made only if a label needs it
        return ProgramRunner(module.deepcopy(), pipeline)

    def unanswered(row: dict[str, Any]) -> set[str]:
        ran = gold_forward(runner(), row)
        if ran is None:
            return set()
        answered = set().union(*(produced[call.predictor] for call in ran[1].calls))
        return set(pipeline.output_names) - answered

    return unanswered


def exact_match_on_free_text(
    metric: str, rows: list[Any], outputs: list[str], choices: Collection[str],
    types: dict[str, Any] | None = None,
) -> str | None:  # fmt: skip
    """exact_match on a free-text output (a summary, a reply) scores a right answer worded
    otherwise 0, which the report would read as a weak student. A typed value (a number, a
    list) has no other wording: exact_match compares it as data."""
    if metric != "exact_match":
        return None
    fields = [name for name in labelled(outputs) if is_text((types or {}).get(name, str))]
    free = [name for name in fields if name not in label_fields(rows, fields, choices)]
    if not free:
        return None
    return (
        f"metric: exact_match compares {', '.join(map(repr, free))} (free text: most train "
        "rows hold a value of their own) character for character, so an answer worded "
        "otherwise scores 0; metric: token_f1 (word overlap) or semantic_f1 (an LM judge) "
        "scores text, or write a metric of your own"
    )


def is_text(annotation: Any) -> bool:
    """`str`, or `str | None`."""
    return optional_inner(annotation)[0] is str


def check_gold_labels(pipeline: PipelineSpec, trainset: list[Any], train: Path) -> None:
    """A gold teacher answers each predictor from the row: every output it has is labelled."""
    for predictor in pipeline.predictors:
        for output in predictor.outputs:
            missing = sum(output.name not in e for e in trainset)
            if missing and output.name == REASONING:
                raise SpecError(
                    f"teacher: gold has no {REASONING!r} to teach predictor "
                    f"{predictor.name!r} (a ChainOfThought: {missing} of {len(trainset)} rows "
                    f"of {train} leave it out); use an API teacher (teacher.model), write a "
                    f"{REASONING!r} in every training row, or make the step a dspy.Predict"
                )
            if missing:
                raise SpecError(
                    f"teacher: gold answers predictor {predictor.name!r} from the train rows, "
                    f"but {missing} rows of {train} lack its output {output.name!r}; label it "
                    "in every row, or use an API teacher (teacher.model)"
                )


@dataclass
class RoundInputs:
    """A round of the retrain loop: the train rows it asks the teacher about, the traces it
    carries from the round before, and the teacher's calibration answers (asked once)."""

    number: int
    rows: list[Any]
    carried: list[Path] = field(default_factory=list)
    teacher_calibration: dict[str, Any] | None = None

    def key(self) -> dict[str, Any]:
        return {"rows": [input_key(dict(e.inputs())) for e in self.rows],
                "carried": [file_sha256(p) for p in self.carried]}  # fmt: skip


@dataclass
class BuildContext:
    spec: BuildSpec
    console: Console
    program: Any
    program_spec: ProgramSpec  # a single-predictor program's signature
    trainset: list[Any]
    calibset: list[Any]  # held out: the router's threshold is chosen here
    testset: list[Any]  # held out: touched once per build, for the report
    metric: Any
    threshold: float
    student: StudentSource
    choices: list[str] = field(default_factory=list)  # outputs typed Literal, Enum or bool
    dirs: dict[str, Path] = field(default_factory=dict)  # finished stage -> its folder
    keys: dict[str, str] = field(default_factory=dict)  # finished stage -> its key
    pipeline: PipelineSpec | None = None  # a multi-step program's description
    sources: dict[str, Path] = field(default_factory=dict)  # its source files
    # With several students: how they compared and which one this build ships (choice.py).
    compared: dict[str, Any] | None = None
    # In the retrain loop: this round's rows and carried traces; and, for the last round's
    # package, every round's summary (loop.py).
    round: RoundInputs | None = None
    rounds: dict[str, Any] | None = None

    @classmethod
    def load(cls, spec: BuildSpec, console: Console) -> BuildContext:
        """Read and check everything the stages need before any of them runs."""
        with recording_reads(spec.program) as reads:
            program = load_program(spec.program)
        check_text_fields(spec.program, program)
        predictors = program.predictors()
        pipeline: PipelineSpec | None = None
        sources: dict[str, Path] = {}
        if len(predictors) == 1 and not runs_own_code(program):
            program_spec = describe_predictor(spec, predictors[0])
            codec = PromptCodec(program_spec)
            inputs, outputs = codec.input_names, codec.output_names
        else:
            first = load_examples(spec.data.train, [], [], "data.train")[0]
            pipeline, sources = describe_pipeline(spec, program, first, reads)
            say_what_ships(pipeline, sources, console)
            program_spec = pipeline.predictors[0]
            inputs, outputs = pipeline.input_names, pipeline.output_names
        optional = pipeline.optional_inputs if pipeline is not None else []
        trainset = load_examples(spec.data.train, inputs, outputs, "data.train", optional)
        types = output_annotations(program)
        choices = choice_fields(types)
        calibset, testset = held_out(spec, inputs, outputs, optional, choices)
        if pipeline is None:
            check_data_values(spec, types, program_spec.inputs)
        else:
            check_data_values(spec, types, unanswered=unanswered_fields(pipeline, program))
        with_typed_labels(trainset + calibset + testset, types)
        if pipeline is None:  # DSPy (the teacher, its optimizers) takes a History, not its JSON
            with_histories(trainset + calibset + testset, program_spec.inputs)
        if pipeline is not None and spec.teacher.is_gold:
            check_gold_labels(pipeline, trainset, spec.data.train)
        unlabelled = unreasoned_rows(trainset) if REASONING in outputs else 0
        if unlabelled and spec.teacher.is_gold:
            raise SpecError(
                f"teacher: gold has no {REASONING!r} to teach (the program is a ChainOfThought "
                f"and {unlabelled} of {len(trainset)} rows of {spec.data.train} leave it out "
                "or blank); use an API teacher (teacher.model), write a "
                f"{REASONING!r} in every training row, or make it a dspy.Predict"
            )
        threshold = spec.metric_threshold
        if threshold is None:
            threshold = 1.0 if spec.metric == "exact_match" else 0.5
        metric = TypedMetric(resolve_metric(spec.metric, judge_spec(spec)), types,
                             metric_judge(spec))  # fmt: skip
        warnings = [
            check_metric(metric, spec.metric, trainset, outputs, threshold),
            served_as_its_predictor(program) if pipeline is None else None,
            exact_match_on_free_text(spec.metric, trainset, outputs, choices, types),
        ]
        for warning in filter(None, warnings):
            console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
        return cls(
            spec=spec, console=console, program=program, program_spec=program_spec,
            trainset=trainset, calibset=calibset, testset=testset, metric=metric,
            threshold=threshold, student=resolve_student(spec.student.source),
            choices=choices, pipeline=pipeline, sources=sources,
        )  # fmt: skip

    @property
    def traced_rows(self) -> list[Any]:
        """The rows the teacher answers in this build (or this round)."""
        return self.round.rows if self.round is not None else self.trainset

    @property
    def input_names(self) -> list[str]:
        return self.pipeline.input_names if self.pipeline else self.codec.input_names

    @property
    def output_names(self) -> list[str]:
        return self.pipeline.output_names if self.pipeline else self.codec.output_names

    @cached_property
    def codec(self) -> PromptCodec:
        return PromptCodec(self.program_spec)

    def forward_arguments(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """A row's inputs as the served program's `forward` gets them (typed by its fields)."""
        return self.runner.forward_arguments(inputs) if self.pipeline else inputs

    @cached_property
    def runner(self) -> ProgramRunner:
        """A multi-step program, its predictors bound to whatever Complete a run is given."""
        assert self.pipeline is not None
        return ProgramRunner(self.program.deepcopy(), self.pipeline)

    def write_program(self, folder: Path, module: Any = None) -> Path:
        """program.json (and a multi-step program's source and state) into `folder`, as the
        bundle carries it; `module` replaces the user's (e.g. with few-shot demos)."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "program.json"
        if self.pipeline is None:
            predictor = (module or self.program).predictors()[0]
            demos = [dict(d.items()) for d in predictor.demos]
            self.program_spec.model_copy(update={"demos": demos}).save(path)
            return path
        self.pipeline.save(path)
        (module or self.program).save(str(folder / self.pipeline.state), save_program=False)
        for rel, source in self.sources.items():
            target = folder / self.pipeline.source.root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        return path

    @cached_property
    def held_out_keys(self) -> set[str]:
        """The calibration and test parts' input keys: no trace may have one."""
        return {input_key(dict(e.inputs())) for e in self.calibset + self.testset}

    @cached_property
    def label_names(self) -> list[str]:
        """The output fields that are labels (typed as a choice, or few distinct values in
        train), not free text."""
        return label_fields(self.trainset, labelled(self.output_names), self.choices)

    @cached_property
    def free_text_names(self) -> list[str]:
        """The labelled output fields that are free text: typed `str`, not labels (scored per
        field by token F1)."""
        types = self.metric.annotations
        return [n for n in labelled(self.output_names)
                if n not in self.label_names and is_text(types.get(n, str))]  # fmt: skip

    @cached_property
    def exact_names(self) -> list[str]:
        """The labelled output fields scored per field by exact match: the labels, and typed
        values (numbers, lists, models), which have no other wording and compare as data."""
        return [n for n in labelled(self.output_names) if n not in self.free_text_names]

    @cached_property
    def dataset_hashes(self) -> dict[str, str]:
        data = self.spec.data
        files = {"train": data.train, "dev": data.dev, "test": data.test}
        return {key: file_sha256(path) for key, path in files.items() if path is not None}

    def task_inputs(self) -> dict[str, Any]:
        """What the task is: program, train data, metric and its threshold (the traces' key;
        held-out data is not in it, so editing dev rows never retrains)."""
        program = self.pipeline or self.program_spec
        return {
            "program": program.model_dump(),
            "source": {rel: file_sha256(path) for rel, path in self.sources.items()},
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
        """The student's GGUF before tuning: given, or written by the convert stage."""
        if not self.student.needs_base_gguf:
            assert self.student.gguf is not None
            return self.student.gguf
        return self.dirs["convert"] / BASE_GGUF

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

    def traces(self) -> list[dict[str, Any]]:
        """The kept traces of the traces stage (this build's, or this round's)."""
        path = self.dirs["traces"] / "traces.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def metric_errors_since(self, start: int, answers: str) -> dict[str, Any] | None:
        """What the metric raised on since `start`, printed as a warning: those answers scored
        0, and a metric that cannot read them may be scoring the model unfairly."""
        errors = self.metric.errors_since(start)
        if errors:
            self.console.print(
                f"  [yellow]warning:[/] the metric raised on {errors['count']} {answers} "
                f"(scored 0); first: {escape(str(errors['first']))}",
                highlight=False,
            )
        return errors

    def read_json(self, stage: str, name: str) -> Any:
        return json.loads((self.dirs[stage] / name).read_text())

    def verdict(self) -> dict[str, Any] | None:
        """The quality gate on the default quantization (None before evaluation)."""
        if "evaluate" not in self.dirs:
            return None
        return gate(self.read_json("evaluate", "eval.json"), self.spec, self.default_quant)


def held_out(
    spec: BuildSpec, inputs: list[str], outputs: list[str], optional: list[str],
    choices: Collection[str] = (),
) -> tuple[list[Any], list[Any]]:  # fmt: skip
    """The calibration and test parts: data.dev split by group, or data.dev and data.test."""
    dev, groups = load_grouped(spec.data.dev, inputs, outputs, "data.dev", optional)
    if spec.data.test is not None:
        return dev, load_examples(spec.data.test, inputs, outputs, "data.test", optional)
    # Stratified by the label fields' values together, so both parts keep the label mix.
    labels = label_fields(dev, labelled(outputs), choices)
    strata = [" | ".join(normalize(e[name]) for name in labels) for e in dev]
    while len(labels) > 1 and min(groups_per_stratum(groups, strata).values()) < 2:
        # A stratum of one group cannot be split: stratify by fewer label fields.
        labels = labels[:-1]
        strata = [" | ".join(normalize(e[name]) for name in labels) for e in dev]
    # Still one group to a value (many labels, few rows): those groups share one stratum, so
    # they are split like the rest rather than all falling to the test part.
    shared = groups_per_stratum(groups, strata)
    strata = [stratum if shared[stratum] > 1 else "\x00rare" for stratum in strata]
    calibration, test = split_by_group(groups, spec.data.calibration_fraction, spec.seed, strata)
    if not calibration or not test:
        raise SpecError(
            f"data.dev: {len(dev)} rows in {len(set(groups))} groups cannot be split into a "
            "calibration and a test part; add held-out rows or name data.test"
        )
    return [dev[i] for i in calibration], [dev[i] for i in test]


def with_typed_labels(examples: list[Any], types: dict[str, Any]) -> None:
    """Each labelled output as its type's value, as DSPy's parser reads an answer (`yes` for a
    bool is True, `3.0` for an int 3, ` A ` for a Literal 'A'): training then writes, and the
    metrics compare, what the served model can answer (`True`), not the row's spelling."""
    typed = {name: t for name, t in types.items() if t is not str and name != REASONING}
    for example in examples:
        for name, annotation in typed.items():
            # a value its type refuses passed the checks as one the program's Python writes
            value = blank_as_none(example.get(name), annotation)
            if name in example and parses(value, annotation):
                example[name] = typed_value(value, annotation)


def trace_examples(traces: list[dict[str, Any]], types: dict[str, Any]) -> list[Any]:
    """Traces (or harvested answers) as the metric's examples, each label of its type as a
    data row's is: a trace is JSON (a model as its dict) and a harvested answer holds the
    API's outputs as their text (`"False"`), which an author's metric would read as a string
    (`bool("False")` is True)."""
    import dspy

    examples = [dspy.Example(**t["inputs"], **t["outputs"]).with_inputs(*t["inputs"])
                for t in traces]  # fmt: skip
    with_typed_labels(examples, types)
    return examples


def with_histories(examples: list[Any], inputs: Sequence[FieldSpec]) -> None:
    """Each dspy.History input of the rows as a dspy.History (a row holds its JSON)."""
    names = [field.name for field in inputs if field.is_history]
    for example in examples:
        for name in names:
            if name in example:
                example[name] = as_history(example[name])


def groups_per_stratum(groups: list[str], strata: list[str]) -> Counter[str]:
    return Counter(dict(zip(groups, strata, strict=True)).values())


def metric_judge(spec: BuildSpec) -> Any:
    """The LM a metric of the user's own may call (a judge predictor inside it): metric_lm,
    else an API teacher; none beside a gold teacher."""
    from services.builder.teacher import teacher_lm

    if spec.metric in BUILTIN_METRICS or spec.metric == "semantic_f1":
        return None
    judge = _judge_of(spec)
    return teacher_lm(judge) if judge is not None else None


def judge_spec(spec: BuildSpec) -> Any:
    """The LM judging an LM-judged metric: metric_lm, else an API teacher."""
    if spec.metric != "semantic_f1":
        return None
    judge = _judge_of(spec)
    if judge is None:
        raise SpecError(
            "metric: semantic_f1 is judged by an LM; set metric_lm (model, api_base, "
            "api_key_env) or an API teacher (teacher.model)"
        )
    return judge


def _judge_of(spec: BuildSpec) -> Any:
    """metric_lm, else an API teacher; None beside a gold teacher."""
    return spec.metric_lm or (None if spec.teacher.is_gold else spec.teacher)


def gate(evaluation: dict[str, Any], spec: BuildSpec, quant: str) -> dict[str, Any]:
    teacher_score = evaluation["teacher"]["score"]
    student_score = next(
        s["score"] for s in evaluation["students"] if s["label"] == f"distilled {quant}"
    )
    retention = decision.retention(student_score, teacher_score)
    return {
        "teacher_score": teacher_score,
        "retention": retention,
        "min_retention": spec.quality_gate.min_retention,
        "passed": retention >= spec.quality_gate.min_retention,
    }
