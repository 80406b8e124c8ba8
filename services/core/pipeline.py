"""Multi-step DSPy programs served as their authors wrote them: source, saved state, `forward`.

A program with several predictors (classify, then extract, then draft; a module calling
modules) ships as its Python source and its `save(save_program=False)` state. Whoever runs it
(the runtime on the local model, the router on the API model, the builder on a model in
training) binds every predictor to a `dspy.LM` whose engine hands each call to a `Complete`
function of theirs: (predictor name, chat messages) -> `LmCall`. The prompts are DSPy's own
ChatAdapter format for each predictor's signature and demos, exactly what the student was
trained on.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import contextlib
import contextvars
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from services.core.program import (
    FieldSpec,
    ProgramFormatError,
    ProgramSpec,
    PromptCodec,
    PromptFormat,
    chat_adapter,
    typed_json,
    value_text,
)

log = logging.getLogger(__name__)

PIPELINE_FORMAT_VERSION: Literal[2] = 2
PIPELINE_KIND: Literal["pipeline"] = "pipeline"


class ProgramCodeError(ProgramFormatError):
    """The program's source cannot be imported or run here."""


class SourceSpec(BaseModel):
    """Where the program's code is: `module:attr` under `root` (a folder of the bundle)."""

    root: str = "source"
    module: str
    attr: str
    files: list[str] = Field(default_factory=list)  # relative to root


class PipelineSpec(BaseModel):
    """program.json of a multi-step program: its top-level fields, each predictor's signature
    (what GetModelInfo shows), and where its source and state are."""

    format_version: Literal[2] = PIPELINE_FORMAT_VERSION
    kind: Literal["pipeline"] = PIPELINE_KIND
    name: str = "program"
    instructions: str = ""
    inputs: list[FieldSpec] = Field(min_length=1)
    outputs: list[FieldSpec] = Field(min_length=1)
    predictors: list[ProgramSpec] = Field(min_length=1)  # each named by its path in the module
    source: SourceSpec
    state: str = "state.json"
    prompt_format: PromptFormat = "chat"  # absent from older bundles (program.py)
    # Distributions the code imports beyond edgedistill's own (`rapidfuzz==3.9.0`): the serving
    # images install them; a host without them is told at start.
    requires: list[str] = Field(default_factory=list)

    @property
    def input_names(self) -> list[str]:
        return [f.name for f in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [f.name for f in self.outputs]

    @property
    def optional_inputs(self) -> list[str]:
        return [f.name for f in self.inputs if not f.required]

    def save(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n")


def read_program_file(path: Path) -> ProgramSpec | PipelineSpec:
    """program.json: a single signature (format 1) or a multi-step program (format 2)."""
    from services.core.program import program_from_file

    try:
        described = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return program_from_file(path)  # says what is wrong with the file
    if not isinstance(described, dict) or described.get("kind") != PIPELINE_KIND:
        return program_from_file(path)
    try:
        return PipelineSpec.model_validate(described)
    except ValueError as err:
        raise ProgramFormatError(f"{path}: not a valid program.json: {err}") from err


def dump_signature_json(program: ProgramSpec | PipelineSpec) -> str:
    """The signature alone (a multi-step program's top-level fields and each predictor's),
    for humans and GetModelInfo."""

    def signature(spec: ProgramSpec | PipelineSpec) -> dict[str, Any]:
        return {
            "instructions": spec.instructions,
            "inputs": [f.model_dump() for f in spec.inputs],
            "outputs": [f.model_dump() for f in spec.outputs],
        }

    described = signature(program)
    if isinstance(program, PipelineSpec):
        described["predictors"] = {p.name: signature(p) for p in program.predictors}
    return json.dumps(described, indent=2)


# -- the program as a module ----------------------------------------------------------------


def make_module(factory: Any) -> Any:
    """A dspy.Module from what `program:` names: a module object, a class or a factory."""
    if isinstance(factory, type) and hasattr(factory, "input_fields"):  # a dspy.Signature
        name = factory.__name__
        raise ProgramCodeError(
            f"{name} is a signature, not a program; name a module, e.g. a function "
            f"`def build(): return dspy.Predict({name})`"
        )
    # A dspy.Module subclass has `named_predictors` too (unbound): it is called like a factory.
    given = hasattr(factory, "named_predictors") and not isinstance(factory, type)
    module = factory() if callable(factory) and not given else factory
    if not hasattr(module, "named_predictors"):
        name = getattr(factory, "__qualname__", None) or repr(factory)
        given_text = f"{type(module).__name__} {module!r}"[:80]
        raise ProgramCodeError(f"{name} did not give a dspy.Module (it gave {given_text})")
    return module


def forward_inputs(module: Any) -> list[str]:
    """The program's input fields: the named parameters of its `forward`; for a `forward(**kw)`
    (DSPy's ReAct, ProgramOfThought), those of the signature the module declares."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = _forward_parameters(module)
    found = [p.name for p in parameters if p.kind in named]
    declared: dict[str, Any] = getattr(getattr(module, "signature", None), "input_fields", {})
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    return list(declared) if not found and takes_any else found


def forward_annotations(module: Any) -> dict[str, Any]:
    """`forward`'s parameter annotations (`max_words: int`), resolved; {} where they cannot be."""
    import typing

    try:
        return typing.get_type_hints(_entry(module))
    except Exception:  # a name only the author's type checker knows: typed as text
        return {}


def forward_defaults(module: Any) -> set[str]:
    """The program's optional inputs: `forward`'s parameters with a default."""
    return {p.name for p in _forward_parameters(module) if p.default is not p.empty}


def _forward_parameters(module: Any) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(_entry(module)).parameters.values())[1:]
    except (TypeError, ValueError, AttributeError):
        return []


def _entry(module: Any) -> Any:
    """The code a call of the program runs: its `forward`, or its `aforward` when it is
    written async only (DSPy's `acall`). Read through the class: DSPy warns when an
    instance's forward is looked up directly."""
    cls = type(module)
    return getattr(cls, "forward", None) or cls.aforward


def runs_async_only(module: Any) -> bool:
    """An `aforward` and no `forward`: DSPy's `module(...)` would fail, `acall` runs it."""
    return not hasattr(type(module), "forward") and hasattr(type(module), "aforward")


def call_program(module: Any, arguments: dict[str, Any]) -> Any:
    """`module(**arguments)`; a module written async only run to its end as `acall`, on an
    event loop of its own (on a thread of its own where this one already runs a loop). DSPy's
    settings (the LM, the adapter, the run) go with it."""
    if not runs_async_only(module):
        return module(**arguments)
    in_this_context = contextvars.copy_context().run  # the settings as they are here
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return in_this_context(asyncio.run, module.acall(**arguments))
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(in_this_context, asyncio.run, module.acall(**arguments)).result()


def predictor_specs(module: Any) -> list[ProgramSpec]:
    """Each predictor's signature and demos, named by its path in the module."""
    return [
        ProgramSpec.from_signature(
            predictor.signature,
            name=path,
            demos=[dict(d.items()) for d in predictor.demos],
            standalone=False,
        )
        for path, predictor in module.named_predictors()
    ]


def missing_dependency(module_name: str, err: ModuleNotFoundError) -> str | None:
    """`M imports N, which is not installed` when importing M failed on a module M imports;
    None when M itself is the one not found."""
    looked_for = err.name or ""
    if (module_name + ".").startswith(looked_for + "."):
        return None
    return f"{module_name!r} imports {looked_for!r}, which is not installed"


def load_module(folder: Path, spec: PipelineSpec) -> Any:
    """Import the program from a bundle's program folder, instantiate it and load its state.
    A module its code imports that is not installed here is named."""
    missing = not_installed(spec.requires)
    if missing:
        wanted = " ".join(f"'{r}'" for r in missing)
        raise ProgramCodeError(
            f"program: its code imports {', '.join(missing)}, not installed here; pip install "
            f"{wanted} beside edgedistill (the images `make build-bundle` builds hold them)"
        )
    root = (folder / spec.source.root).resolve()
    state = (folder / spec.state).resolve()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    # The code runs from its folder, as it ran from the build's: the files its import or its
    # factory read there (`program.load("optimized.json")`) are shipped beside it.
    with contextlib.chdir(root):
        code = _import_program(root, spec)
        factory = getattr(code, spec.source.attr, None)
        if factory is None:
            raise ProgramCodeError(f"program: {spec.source.module} has no {spec.source.attr!r}")
        try:
            module = make_module(factory)
        except ProgramCodeError:
            raise
        except Exception as err:  # the author's factory failed here
            raise ProgramCodeError(
                f"program: {spec.source.module}:{spec.source.attr} raised "
                f"{type(err).__name__}: {err} (run in {root})"
            ) from err
    module.load(str(state))
    return module


def not_installed(requires: list[str]) -> list[str]:
    """The `dist==version` requirements whose distribution is not installed (any version)."""
    missing = []
    for requirement in requires:
        try:
            importlib.metadata.version(requirement.partition("==")[0])
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
    return missing


def _import_program(root: Path, spec: PipelineSpec) -> Any:
    writes_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # no __pycache__ in the bundle: it stays as signed
    try:
        return importlib.import_module(spec.source.module)
    except ModuleNotFoundError as err:
        missing = missing_dependency(spec.source.module, err)
        raise ProgramCodeError(
            f"program: {missing} here (the program's code is in {root}); install it in the "
            "serving image or remove the import"
            if missing
            else f"program: {root} holds no module {spec.source.module!r}: the bundle's "
            "program folder is incomplete"
        ) from err
    except Exception as err:  # a network call or any error at import time
        raise ProgramCodeError(
            f"program: importing {spec.source.module} from {root} failed: "
            f"{type(err).__name__}: {err}"
        ) from err
    finally:
        sys.dont_write_bytecode = writes_bytecode


def local_sources(module_name: str, roots: list[Path]) -> dict[str, Path]:
    """The program's module and the modules of the user's own it imports (found under `roots`,
    not installed packages), with their packages' __init__.py: path under the import root
    (as the module's dotted name lays it out) -> file."""
    roots = [r.resolve() for r in roots]
    found: dict[str, Path] = {}
    pending = [module_name]
    while pending:
        name = pending.pop()
        origin = _module_file(name)
        if origin is None or installed(origin):
            continue
        depth = name.count(".") + (2 if origin.name == "__init__.py" else 1)
        root = origin.parents[depth - 1]
        if root not in roots or origin.relative_to(root).as_posix() in found:
            continue
        found[origin.relative_to(root).as_posix()] = origin
        parts = name.split(".")
        for end in range(1, len(parts)):  # the packages on the way, when they have a file
            init = root.joinpath(*parts[:end], "__init__.py")
            if init.is_file():
                found.setdefault(init.relative_to(root).as_posix(), init)
        pending += imported_names(origin, name)
    return found


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin).resolve()


def installed(path: Path) -> bool:
    """A file of an installed package or of edgedistill itself: never the user's program."""
    services = Path(__file__).resolve().parents[1]
    return "site-packages" in path.parts or path.is_relative_to(services)


def imported_names(path: Path, module_name: str) -> list[str]:
    """The modules a file of `module_name` imports (and may import from: `a.b` for `from a
    import b`), relative imports resolved."""
    package = module_name if path.name == "__init__.py" else module_name.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                prefix = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{prefix}.{base}".strip(".")
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return [n for n in names if n]


# -- running it ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LmCall:
    """One predictor call's completion and what it cost."""

    predictor: str
    text: str
    confidence: float
    outcome: str  # "parsed" | "unparsed" | "truncated", as the caller's parser judged it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    decode_steps: int | None = None  # sampled tokens, when typed decoding forced some


Complete = Callable[[str, list[dict[str, str]]], LmCall]


@dataclass
class RunResult:
    outputs: dict[str, str] | None  # None when a predictor's answer did not parse
    outcome: str
    calls: list[LmCall] = field(default_factory=list)
    outputs_json: str = ""  # the outputs typed, in order (program.typed_json)

    @property
    def confidence(self) -> float:
        """The lowest over the program's calls: a chain is as sure as its weakest step."""
        if self.outputs is None or not self.calls:
            return 0.0
        return min(call.confidence for call in self.calls)

    @property
    def raw_text(self) -> str:
        return "\n\n".join(f"## {c.predictor}\n{c.text}" for c in self.calls)


class ProgramFailed(Exception):
    """The program's own code raised (not an LM call): the type and message, for the caller."""

    def __init__(self, error: BaseException, calls: list[LmCall]) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error
        self.calls = calls


@dataclass
class _Run:
    complete: Complete
    calls: list[LmCall] = field(default_factory=list)
    failure: BaseException | None = None  # what a Complete raised (cancelled, deadline, ...)


# The run a predictor's call belongs to, in DSPy's settings: DSPy hands them on to the threads
# dspy.Parallel and Module.batch run calls on (a context variable would not reach them).
_RUN_SETTING = "edgedistill_run"


def _current_run() -> _Run | None:
    import dspy

    run: _Run | None = getattr(dspy.settings, _RUN_SETTING, None)
    return run


_CALL_TEMPERATURE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "call_temperature", default=None
)


def call_temperature() -> float | None:
    """The temperature the program set for the predictor call being made, read by a Complete
    on the program's thread: BestOfN and Refine ask for each attempt at 1.0 (their LM's
    copy), so that attempts differ. None when the program set none (the request's applies)."""
    return _CALL_TEMPERATURE.get()


def request_messages(request: Any) -> list[dict[str, str]]:
    """A dspy engine request (dspy.lm15.Request) as chat messages."""
    messages = []
    if request.system is not None:
        system = request.system
        text = system if isinstance(system, str) else "".join(p.text for p in system)
        messages.append({"role": "system", "content": text})
    messages += [{"role": m.role, "content": m.text or ""} for m in request.messages]
    return messages


class StepNotAnswered(RuntimeError):
    """A predictor call the caller judged not parsed (cut at max_tokens, or unreadable): the
    run ends there, though DSPy might read a value from its text. A program that catches it
    (Refine's next attempt) goes on."""

    def __init__(self, predictor: str, outcome: str) -> None:
        super().__init__(f"{predictor}: {outcome}")
        self.outcome = outcome


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """The error, then the one it was raised from or while handling, and so on (a library
    may wrap what was raised); once each, as a chain may loop back on itself."""
    found: BaseException | None = error
    seen: set[int] = set()
    while found is not None and id(found) not in seen:
        yield found
        seen.add(id(found))
        found = found.__cause__ or found.__context__


class _PredictorEngine:
    """A dspy engine for one predictor: each call goes to the current run's Complete."""

    def __init__(self, predictor: str) -> None:
        self.predictor = predictor

    def complete(self, request: Any) -> Any:
        from dspy.lm15 import Message, Response, TextPart, Usage

        run = _current_run()
        if run is None:
            raise RuntimeError("a served program's LM was called outside ProgramRunner.run")
        token = _CALL_TEMPERATURE.set(request.config.temperature)
        try:
            call = run.complete(self.predictor, request_messages(request))
        except BaseException as err:  # kept: DSPy would wrap it in its own error types
            run.failure = err
            raise
        finally:
            _CALL_TEMPERATURE.reset(token)
        run.calls.append(call)
        if call.outcome != "parsed":  # ends the run, whatever DSPy could still read of the text
            run.failure = StepNotAnswered(self.predictor, call.outcome)
            raise run.failure
        return Response(
            id=None, model=request.model, message=Message.assistant([TextPart(call.text)]),
            finish_reason="length" if call.outcome == "truncated" else "stop",
            usage=Usage(input_tokens=call.prompt_tokens, output_tokens=call.completion_tokens),
        )  # fmt: skip

    def stream(self, request: Any) -> Any:
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


class UnboundPredictor(ProgramCodeError):
    """`forward` called a predictor the module does not hold (made as it ran): no student
    learns it and nothing serves it."""


def unbound_predictor_message(outputs: list[str]) -> str:
    """What is wrong with a predictor made as forward ran, which no student learns and
    nothing serves, named by its outputs."""
    return (
        f"forward called a predictor that is not an attribute of the module (outputs "
        f"{', '.join(outputs) or 'unknown'}), made as it ran; make it one in __init__ "
        "(self.step = dspy.Predict(...)) so it is distilled and served with the others"
    )


class _UnboundEngine(_PredictorEngine):
    """The context's LM during a run: only a predictor made inside `forward` reaches it."""

    def __init__(self) -> None:
        super().__init__("")

    def complete(self, request: Any) -> Any:
        system = next(
            (m["content"] for m in request_messages(request) if m["role"] == "system"), ""
        )
        asked = system.partition("Your output fields are:")[2]
        outputs = re.findall(r"^\d+\. `(\w+)`", asked, re.M)
        error = UnboundPredictor(unbound_predictor_message(outputs))
        run = _current_run()
        if run is not None:
            run.failure = error
        raise error


class _AsyncEngine:
    """An engine's async counterpart, for a program written async (`aforward`, `acall`):
    each call on a thread of its own, so calls the program gathers run side by side."""

    def __init__(self, engine: _PredictorEngine) -> None:
        self._engine = engine

    async def complete(self, request: Any) -> Any:
        return await asyncio.to_thread(self._engine.complete, request)

    async def stream(self, request: Any) -> Any:
        from dspy.lm15 import response_to_events

        for event in response_to_events(await self.complete(request)):
            yield event

    async def aclose(self) -> None:
        pass


def served_adapter(prompt_format: PromptFormat = "chat") -> Any:
    """The adapter every predictor is trained and served with."""
    return chat_adapter(prompt_format)


def carried_outputs(prediction: Any, declared: list[str]) -> list[str]:
    """The program's outputs, then any other field its final prediction carries (a value its
    Python computed, `adult=age >= 18`; a ChainOfThought step's reasoning), in its order: the
    response holds what the author's program returns."""
    return declared + [name for name in prediction.keys() if name not in declared]  # noqa: SIM118


def tool_argument_schemas(module: Any) -> dict[str, dict[str, tuple[str, dict[str, str]]]]:
    """For each DSPy ReAct step predictor in the module (by its path): its tool arguments'
    JSON Schema for each tool it may name, so a step's arguments are decoded as the tool it
    chose takes them (its parameters by name and type; `finish` none)."""
    import dspy

    found: dict[str, dict[str, tuple[str, dict[str, str]]]] = {}
    for name, agent in module.named_sub_modules(dspy.ReAct):
        owner = name.removeprefix("self").removeprefix(".")  # "self.agent" -> "agent"
        tools = {tool: tool_arguments_schema(t) for tool, t in agent.tools.items()}
        found[f"{owner}.react" if owner else "react"] = {
            "next_tool_args": ("next_tool_name", tools)
        }
    return found


def tool_arguments_schema(tool: Any) -> str:
    """A dspy.Tool's arguments as one JSON object's schema: each parameter typed, those
    without a default required, no others unless the function takes **kwargs."""
    variadic = _variadic_parameters(getattr(tool, "func", None))
    args = {name: schema for name, schema in (tool.args or {}).items() if name not in variadic}
    return json.dumps({
        "type": "object", "properties": args,
        "required": [name for name, schema in args.items() if "default" not in schema],
        "additionalProperties": bool(getattr(tool, "has_kwargs", False)),
    })  # fmt: skip


def _variadic_parameters(func: Any) -> set[str]:
    """A function's `*args` and `**kwargs` names (which dspy.Tool lists as arguments)."""
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return set()
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {p.name for p in parameters if p.kind in variadic}


class ProgramRunner:
    """A loaded multi-step program; `run` is thread-safe (each run has its own calls)."""

    def __init__(self, module: Any, spec: PipelineSpec) -> None:
        import dspy

        self.module = module
        self.spec = spec
        self.predictors = dict(module.named_predictors())
        names = [p.name for p in spec.predictors]
        if sorted(self.predictors) != sorted(names):
            raise ProgramCodeError(
                f"program: the code has predictors {sorted(self.predictors)}, program.json "
                f"describes {sorted(names)}: the bundle's source and program.json disagree"
            )
        # A truncated call is this run's TRUNCATED outcome; DSPy's own warning per call is noise.
        logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)
        for name, predictor in self.predictors.items():
            engine = _PredictorEngine(name)
            predictor.lm = dspy.LM(f"edgedistill/{name}", engine=engine,
                                   async_engine=_AsyncEngine(engine), cache=False,
                                   num_retries=0)  # fmt: skip
        # The context's LM in a run: only a predictor made inside forward calls it.
        unbound = _UnboundEngine()
        self.unbound = dspy.LM("edgedistill/unbound", engine=unbound,
                               async_engine=_AsyncEngine(unbound), cache=False,
                               num_retries=0)  # fmt: skip
        self.codecs = {
            name: PromptCodec.for_signature(p.signature, p.demos, spec.prompt_format)
            for name, p in self.predictors.items()
        }
        for name, schemas in tool_argument_schemas(module).items():
            self.codecs[name].value_schemas = schemas

    @classmethod
    def load(cls, program_json: Path, spec: PipelineSpec) -> ProgramRunner:
        return cls(load_module(program_json.parent, spec), spec)

    def run(self, inputs: dict[str, Any], complete: Complete) -> RunResult:
        """Run `forward`; an answer that does not parse ends the run as UNPARSED/TRUNCATED,
        what Complete raised is raised again, anything else the program raised is
        ProgramFailed."""
        prediction, run = self.forward(inputs, complete)
        if prediction is None:
            failed = run.failure
            last = run.calls[-1].outcome if run.calls else "unparsed"
            last = failed.outcome if isinstance(failed, StepNotAnswered) else last
            outcome = "truncated" if last == "truncated" else "unparsed"
            return RunResult(None, outcome, run.calls)
        missing = [n for n in self.spec.output_names if n not in prediction]
        if missing:
            error = ValueError(f"forward's prediction has no {', '.join(map(repr, missing))}")
            raise ProgramFailed(error, run.calls)
        names = carried_outputs(prediction, self.spec.output_names)
        values = {name: prediction.get(name) for name in names}
        return RunResult(
            {name: value_text(values[name]) for name in names}, "parsed", run.calls,
            outputs_json=typed_json(values, names),
        )  # fmt: skip

    def forward_arguments(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The inputs typed as the program's fields are (a request's `"3"` an int `3`)."""
        fields = {f.name: f for f in self.spec.inputs}
        return {
            name: fields[name].forward_value(value) if name in fields else value
            for name, value in inputs.items()
        }

    def forward(self, inputs: dict[str, Any], complete: Complete) -> tuple[Any, _Run]:
        """The program's own final prediction (None when an answer did not parse) and the
        run's calls; errors as `run` says."""
        import dspy

        run = _Run(complete)
        try:
            adapter = served_adapter(self.spec.prompt_format)
            with dspy.context(adapter=adapter, disable_history=True, lm=self.unbound,
                              **{_RUN_SETTING: run}):  # fmt: skip
                return call_program(self.module, self.forward_arguments(inputs)), run
        except dspy.utils.exceptions.AdapterParseError:
            return None, run
        except BaseException as err:
            failure = run.failure
            if isinstance(failure, StepNotAnswered):  # no answer, as for a parse error
                if not any(e is failure for e in exception_chain(err)):
                    # The program caught it, then failed: on what the call did not answer
                    # (Module.batch hands back None for it). The model's failure, not the
                    # program's: a router sends it to the API model as any unparsed answer.
                    log.warning("the program raised %s: %s after a call it caught (%s)",
                                type(err).__name__, err, failure)  # fmt: skip
                return None, run
            if failure is not None:
                raise failure from None
            raise ProgramFailed(err, run.calls) from err
