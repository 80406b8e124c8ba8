"""Multi-step DSPy programs: distilled predictor by predictor, shipped as source + state, and
served by running their own `forward` on the local model.

The decisions (which files ship, how a run chains its calls, how probes batch them) run
without a model; the rest is a real short fine-tune of SmolLM2, a real bundle and a real
runtime on loopback."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.core.api import pb
from services.core.bundle import Bundle
from services.core.client import InferenceClient
from services.core.pipeline import (
    LmCall,
    PipelineSpec,
    ProgramCodeError,
    ProgramFailed,
    ProgramRunner,
    SourceSpec,
    local_sources,
    make_module,
    predictor_specs,
    read_program_file,
)
from services.core.program import FieldSpec, PromptFormat
from testkit.processes import REPO, ServerProcess, start_router, start_runtime
from testkit.scratch import scratch

SUPPORT = REPO / "examples" / "support_pipeline"
# A real (short) fine-tune on 2 CPU cores: minutes, not seconds.
pytestmark = pytest.mark.timeout(1800)
PROGRAM = "tests.programs.two_step:build"


def two_step_runner() -> ProgramRunner:
    from tests.programs.two_step import build

    module = build()
    spec = PipelineSpec(
        name="two-step", inputs=[FieldSpec(name="ticket")],
        outputs=[FieldSpec(name="category"), FieldSpec(name="reply")],
        predictors=predictor_specs(module),
        source=SourceSpec(module="tests.programs.two_step", attr="build"),
    )  # fmt: skip
    return ProgramRunner(module, spec)


def scripted(runner: ProgramRunner, answers: dict[str, dict[str, str]], seen: list[Any]) -> Any:
    """A Complete answering each predictor with fixed values, recording what it was sent."""

    def complete(name: str, messages: list[dict[str, str]]) -> LmCall:
        seen.append((name, messages))
        text = runner.codecs[name].format_assistant(answers[name])
        confidence = {"classify": 0.9, "draft": 0.6}[name]
        return LmCall(name, text, confidence, "parsed", prompt_tokens=10, completion_tokens=3)

    return complete


# -- decisions, without a model -----------------------------------------------------------


def test_the_program_ships_with_its_own_local_modules_and_not_installed_ones() -> None:
    files = local_sources("tests.programs.two_step", [REPO])
    assert set(files) == {
        "tests/__init__.py", "tests/programs/__init__.py",
        "tests/programs/two_step.py", "tests/programs/signatures.py",  # imported by two_step
    }  # fmt: skip
    assert files["tests/programs/signatures.py"] == REPO / "tests/programs/signatures.py"


def test_program_names_a_module_object_its_class_or_a_factory() -> None:
    """`program: pkg.mod:TwoStep` (the class) is instantiated like a factory: a dspy.Module
    subclass has `named_predictors` too, and was taken for a module object."""
    from tests.programs import two_step

    for given in (two_step.TwoStep, two_step.build, two_step.build()):
        module = make_module(given)
        assert isinstance(module, two_step.TwoStep) and len(module.predictors()) == 2
    with pytest.raises(ProgramCodeError, match=r"did not give a dspy\.Module"):
        make_module(dict)


def test_a_react_agent_takes_its_signatures_inputs_and_needs_an_api_teacher(
    tmp_path: Path,
) -> None:
    """DSPy's ReAct has `forward(**input_args)`: its inputs are its signature's. A gold teacher
    cannot label its steps (thought, tool, arguments), which the build says before running."""
    from rich.console import Console

    from services.builder.context import BuildContext
    from services.builder.spec import SpecError, load_spec
    from services.core.pipeline import forward_inputs
    from tests.programs.react import build

    assert forward_inputs(build()) == ["question"]
    rows = "".join(json.dumps({"question": f"a mug and {n} lamps?", "total": 8 + 25 * n}) + "\n"
                   for n in range(4))  # fmt: skip
    (tmp_path / "train.jsonl").write_text(rows)
    (tmp_path / "dev.jsonl").write_text(rows)
    (tmp_path / "spec.yaml").write_text(
        "name: quote\nprogram: tests.programs.react:build\n"
        "data: {train: train.jsonl, dev: dev.jsonl}\n"
    )
    with pytest.raises(SpecError, match=r"lack its output 'next_thought'.*use an API teacher"):
        BuildContext.load(load_spec(tmp_path / "spec.yaml"), Console(quiet=True))


def test_a_run_chains_the_predictors_and_its_confidence_is_the_weakest_call() -> None:
    runner = two_step_runner()
    seen: list[Any] = []
    answers = {
        "classify": {"category": "network"},
        "draft": {"reply": "The network team is on it."},
    }
    result = runner.run({"ticket": "VPN is down"}, scripted(runner, answers, seen))

    assert result.outcome == "parsed"
    assert result.outputs == {"category": "network", "reply": "The network team is on it."}
    assert [c.predictor for c in result.calls] == ["classify", "draft"]
    assert result.confidence == pytest.approx(0.6)  # the lowest of 0.9 and 0.6
    # The second predictor was prompted with the first one's answer, as ChatAdapter formats it.
    assert "[[ ## category ## ]]\nnetwork" in seen[1][1][-1]["content"]
    assert seen[0][1] == runner.codecs["classify"].format_messages({"ticket": "VPN is down"})


def test_an_unparsed_step_ends_the_run_and_a_raising_forward_is_the_programs_failure() -> None:
    runner = two_step_runner()

    def babble(name: str, messages: list[dict[str, str]]) -> LmCall:
        return LmCall(name, "no fields here", 0.0, "unparsed")

    result = runner.run({"ticket": "x"}, babble)
    assert result.outputs is None and result.outcome == "unparsed" and len(result.calls) == 1
    assert result.confidence == 0.0

    # A step cut at max_tokens ends the run though DSPy could read its text: no next call.
    complete = scripted(runner, {"classify": {"category": "network"}}, [])

    def cut(name: str, messages: list[dict[str, str]]) -> LmCall:
        call = complete(name, messages)
        return LmCall(name, call.text, 0.0, "truncated")

    result = runner.run({"ticket": "x"}, cut)
    assert result.outcome == "truncated" and [c.predictor for c in result.calls] == ["classify"]

    # ... and when the program catches it (Refine's next attempt, Module.batch's None) and
    # then fails, the run is still that call's: not answered (a router falls back), though a
    # later call answered.
    answers = {"classify": {"category": "network"}, "draft": {"reply": "ok"}}
    module = runner.module

    def retry_then_fail(ticket: str) -> None:
        with contextlib.suppress(Exception):  # as Refine does; DSPy wraps StepNotAnswered
            module.classify(ticket=ticket)
        module.draft(ticket=ticket, category="network")
        raise ValueError("the program's own check")

    def cut_first(name: str, messages: list[dict[str, str]]) -> LmCall:
        call = scripted(runner, answers, [])(name, messages)
        return replace(call, outcome="truncated") if name == "classify" else call

    module.forward = retry_then_fail
    result = runner.run({"ticket": "x"}, cut_first)
    assert result.outputs is None and result.outcome == "truncated"
    assert [c.predictor for c in result.calls] == ["classify", "draft"]
    del module.forward

    def refuse(name: str, messages: list[dict[str, str]]) -> LmCall:
        raise TimeoutError("deadline")  # what the caller's Complete raises comes back as is

    with pytest.raises(TimeoutError, match="deadline"):
        runner.run({"ticket": "x"}, refuse)

    with pytest.raises(ProgramFailed, match="TypeError"):  # forward() given a wrong input
        runner.run({"tickets": "x"}, scripted(runner, answers, []))

    # A value the program's own code set to None is an answer (null), not a missing field.
    import dspy

    forward = runner.forward
    runner.forward = lambda inputs, complete: (  # type: ignore[method-assign]
        dspy.Prediction(category="network", reply=None),
        forward(inputs, complete)[1],
    )
    result = runner.run({"ticket": "x"}, scripted(runner, answers, []))
    assert result.outcome == "parsed" and json.loads(result.outputs_json)["reply"] is None
    runner.forward = forward  # type: ignore[method-assign]

    # A declared output the final prediction lacks is the program's error, never "".
    runner.spec.outputs.append(FieldSpec(name="team"))
    with pytest.raises(ProgramFailed, match="prediction has no 'team'"):
        runner.run({"ticket": "x"}, scripted(runner, answers, []))


def test_probes_answer_every_row_in_one_batch_per_step() -> None:
    from services.builder.probe import run_lockstep

    runner = two_step_runner()
    batches: list[int] = []

    def ask(prompts: list[list[dict[str, str]]], starts: list[str], stops: tuple[str, ...],
            choices: tuple[str, ...]) -> list[str]:  # fmt: skip
        batches.append(len(prompts))
        out = []
        for messages, start in zip(prompts, starts, strict=True):
            assert start.endswith(("[[ ## category ## ]]\n", "[[ ## reply ## ]]\n"))
            if start.endswith("[[ ## category ## ]]\n"):  # the header is written: the value
                out.append("access")
            else:
                ticket = messages[-1]["content"].split("\n")[1]
                out.append(f"About {ticket}: the access team will help.")
        return out

    rows = [{"ticket": f"ticket {i}"} for i in range(7)]
    results = run_lockstep(runner, rows, ask)
    assert batches == [7, 7]  # two steps, each answered for all rows at once
    for row, result in zip(rows, results, strict=True):
        assert result.outputs == {
            "category": "access", "reply": f"About {row['ticket']}: the access team will help."
        }  # fmt: skip

    def broken(prompts: list[list[dict[str, str]]], starts: list[str], stops: tuple[str, ...],
               choices: tuple[str, ...]) -> list[str]:  # fmt: skip
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):  # raised, not a hang
        run_lockstep(runner, rows, broken)


def test_gold_traces_give_every_predictor_its_labelled_values(tmp_path: Path) -> None:
    import dspy

    from services.builder.metrics import exact_match
    from services.builder.spec import TeacherSpec
    from services.builder.teacher import collect_traces

    runner = two_step_runner()
    rows = [
        {"ticket": "VPN down", "category": "network", "reply": "Network team on it."},
        {"ticket": "Refund?", "category": "billing", "reply": "Billing will check."},
    ]
    trainset = [dspy.Example(**r).with_inputs("ticket") for r in rows]
    counts = collect_traces(
        program=runner.module, teacher=TeacherSpec(), trainset=trainset, metric=exact_match,
        threshold=1.0, output_names=["category", "reply"], out_dir=tmp_path, runner=runner,
    )  # fmt: skip
    assert counts.kept == 2
    summary = json.loads((tmp_path / "counts.json").read_text())
    assert summary["predictors"] == {"classify": {"kept": 2, "rejected": 0},
                                     "draft": {"kept": 2, "rejected": 0}}  # fmt: skip
    first = json.loads((tmp_path / "traces.jsonl").read_text().splitlines()[0])
    assert first["calls"] == [
        {"predictor": "classify", "inputs": {"ticket": "VPN down"},
         "outputs": {"category": "network"}},
        {"predictor": "draft", "inputs": {"ticket": "VPN down", "category": "network"},
         "outputs": {"reply": "Network team on it."}},
    ]  # fmt: skip


def test_an_api_teacher_runs_the_whole_program_and_every_call_is_traced(tmp_path: Path) -> None:
    import dspy

    from services.builder.spec import TeacherSpec
    from services.builder.teacher import collect_traces
    from testkit.openai_standin import OpenAIStandIn

    runner = two_step_runner()
    rows = [{"ticket": "VPN down", "category": "network", "reply": "x"},
            {"ticket": "Refund?", "category": "billing", "reply": "x"}]  # fmt: skip
    trainset = [dspy.Example(**r).with_inputs("ticket") for r in rows]

    def category_only(example: Any, prediction: Any, trace: Any = None) -> bool:
        return bool(example.category == prediction.category)

    # The stand-in labels "VPN down" right and "Refund?" wrong; any other field it is asked
    # for (the draft's reply) gets a fixed sentence.
    with OpenAIStandIn({"VPN down": "network", "Refund?": "access"}) as api:
        teacher = TeacherSpec(model="openai/teacher", api_base=api.base_url, num_threads=1)
        counts = collect_traces(
            program=runner.module, teacher=teacher, trainset=trainset, metric=category_only,
            threshold=1.0, output_names=["category", "reply"], out_dir=tmp_path, runner=runner,
        )  # fmt: skip
        requests = api.requests
    assert (counts.kept, counts.rejected, requests) == (1, 1, 4)
    kept = json.loads((tmp_path / "traces.jsonl").read_text())
    assert [c["predictor"] for c in kept["calls"]] == ["classify", "draft"]
    assert kept["calls"][1]["inputs"] == {"ticket": "VPN down", "category": "network"}
    assert kept["calls"][1]["outputs"] == {"reply": "Answer precisely and briefly."}
    summary = json.loads((tmp_path / "counts.json").read_text())["predictors"]
    assert summary["draft"] == {"kept": 1, "rejected": 1}


def test_an_api_teacher_runs_refine_as_written_and_its_chosen_answer_is_the_trace(
    tmp_path: Path,
) -> None:
    """dspy.Refine around the predictor: at temperature 1 the stand-in answers the wavering
    ticket "billing", which the reward refuses; Refine asks the teacher LM for advice (a call
    of its own, in the trace) and tries again. The answer Refine keeps is the row's trace."""
    import dspy

    from services.builder.evaluate import evaluate_teacher
    from services.builder.spec import TeacherSpec
    from services.builder.teacher import collect_traces
    from testkit.openai_standin import OpenAIStandIn
    from tests.programs.wrapped import build_refined

    rows = [{"ticket": "VPN down", "category": "network"},
            {"ticket": "Laptop screen cracked", "category": "hardware"}]  # fmt: skip
    trainset = [dspy.Example(**r).with_inputs("ticket") for r in rows]

    def category_only(example: Any, prediction: Any, trace: Any = None) -> bool:
        return bool(example.category == prediction.category)

    gold = {r["ticket"]: r["category"] for r in rows} | {"x": "billing"}
    with OpenAIStandIn(gold, wavering={"Laptop screen cracked"}) as api:
        teacher = TeacherSpec(model="openai/teacher", api_base=api.base_url, num_threads=1)
        counts = collect_traces(
            program=build_refined(), teacher=teacher, trainset=trainset, metric=category_only,
            threshold=1.0, output_names=["category"], out_dir=tmp_path,
        )  # fmt: skip
        requests = api.requests
        evaluated = evaluate_teacher(
            program=build_refined(), teacher=teacher, examples=trainset, splits=["test"] * 2,
            metric=category_only, output_names=["category"],
        )  # fmt: skip
        evaluating = api.requests - requests
    assert (counts.kept, counts.rejected, counts.failed) == (1, 1, 0)
    assert requests == 1 + 3 + 2  # one attempt; three attempts with advice between them
    rejected = json.loads((tmp_path / "rejected.jsonl").read_text())
    assert rejected["outputs"] == {"category": "billing"}
    assert evaluating == requests and evaluated["failures"] == 0  # its held-out answers alike


def test_a_predictor_made_inside_forward_is_refused_naming_the_fix(tmp_path: Path) -> None:
    """`dspy.Predict("ticket -> note")(...)` inside forward is no attribute of the module: no
    student learns it and the runtime has nothing to answer it with. The gold run at load
    refuses it; an API teacher's run of it fails the row, naming the fix, not the build."""
    import dspy

    from services.builder.spec import SpecError, TeacherSpec
    from services.builder.teacher import collect_traces
    from testkit.openai_standin import OpenAIStandIn
    from tests.programs.two_step import build_inline_note

    with pytest.raises(SpecError, match=r"not an attribute of the module \(outputs note\).*"
                       r"make it one in __init__"):  # fmt: skip
        two_step_context(tmp_path, "build_inline_note")
    module = build_inline_note()
    spec = PipelineSpec(
        name="inline", inputs=[FieldSpec(name="ticket")], outputs=[FieldSpec(name="category")],
        predictors=predictor_specs(module),
        source=SourceSpec(module="tests.programs.two_step", attr="build_inline_note"),
    )  # fmt: skip
    runner = ProgramRunner(module, spec)
    trainset = [dspy.Example(ticket="VPN down", category="network").with_inputs("ticket")]
    with OpenAIStandIn({"VPN down": "network"}) as api:
        teacher = TeacherSpec(model="openai/teacher", api_base=api.base_url,
                              max_failure_fraction=1.0)  # fmt: skip
        counts = collect_traces(
            program=module, teacher=teacher, trainset=trainset, metric=lambda e, p, t=None: 1.0,
            threshold=1.0, output_names=["category"], out_dir=tmp_path, runner=runner,
            require_kept=False,
        )  # fmt: skip
    assert counts.failed == 1
    failed = json.loads((tmp_path / "failed.jsonl").read_text())
    assert "not an attribute of the module (outputs note)" in failed["error"]


def test_a_gold_teacher_needs_every_predictors_outputs_labelled(tmp_path: Path) -> None:
    import dspy

    from services.builder.context import check_gold_labels
    from services.builder.spec import SpecError

    runner = two_step_runner()
    trainset = [dspy.Example(ticket="x", category="network").with_inputs("ticket")]
    with pytest.raises(SpecError, match=r"predictor 'draft'.*lack its output 'reply'"):
        check_gold_labels(runner.spec, trainset, tmp_path / "train.jsonl")

    # A ChainOfThought step's reasoning, which gold rows seldom hold: said as such, with the
    # ways out.
    class Reasoned(dspy.Module):
        def __init__(self) -> None:
            super().__init__()
            self.think = dspy.ChainOfThought("question -> answer")

    reasoned = PipelineSpec(
        name="reasoned", inputs=[FieldSpec(name="question")], outputs=[FieldSpec(name="answer")],
        predictors=predictor_specs(Reasoned()), source=SourceSpec(module="m", attr="build"),
    )  # fmt: skip
    rows = [dspy.Example(question="q", answer="a").with_inputs("question")]
    with pytest.raises(SpecError, match=r"no 'reasoning' to teach predictor 'think.predict' "
                       r"\(a ChainOfThought.*or make the step a dspy.Predict"):  # fmt: skip
        check_gold_labels(reasoned, rows, tmp_path / "train.jsonl")


# -- built, shipped and served ----------------------------------------------------------------

TWO_STEP_SPEC = """
name: two-step
version: "0.0.1-test"
program: {program}
data: {{train: train.jsonl, dev: dev.jsonl}}
metric: exact_match
lora: {{epochs: 3, batch_size: 4, min_steps: 0, checkpoints: 0, patience: 0,
        scaffold_weight: 1.0}}
quantizations: [Q8_0]
quality_gate: {{min_retention: 0.0}}
baselines: {{few_shot_k: 0}}
n_threads: 2
eval_max_tokens: 48
output: {output}
"""


def support_rows(name: str, per_category: int) -> list[dict[str, str]]:
    picked: dict[str, int] = {}
    out = []
    for line in (SUPPORT / f"{name}.jsonl").read_text().splitlines():
        row = json.loads(line)
        if picked.get(row["category"], 0) < per_category:
            picked[row["category"]] = picked.get(row["category"], 0) + 1
            out.append({k: row[k] for k in ("ticket", "category", "reply", "group")})
    return out


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_an_intermediate_label_is_answered_by_gold_but_is_not_an_output(tmp_path: Path) -> None:
    """A forward that returns only its last step's prediction, rows labelling every step (as a
    gold teacher needs) and an id column: the program's output is the reply alone, and every
    gold trace passes exact_match (the category and the id are not compared)."""
    from rich.console import Console

    from services.builder.context import BuildContext
    from services.builder.pipeline import STAGES, build
    from services.builder.spec import load_spec

    rows = [{**row, "id": n} for n, row in enumerate(support_rows("train", 1))]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "dev.jsonl", support_rows("dev", 1))
    (tmp_path / "spec.yaml").write_text(
        "name: last-step\nprogram: tests.programs.two_step:build_last_step\n"
        f"data: {{train: train.jsonl, dev: dev.jsonl}}\noutput: {tmp_path / 'build'}\n"
    )
    spec = load_spec(tmp_path / "spec.yaml")
    ctx = BuildContext.load(spec, Console(quiet=True))
    assert ctx.pipeline is not None and ctx.pipeline.output_names == ["reply"]
    build(spec, Console(file=io.StringIO()), stages=STAGES[:1])
    counts = json.loads((tmp_path / "build" / "traces" / "counts.json").read_text())
    assert (counts["total"], counts["kept"]) == (len(rows), len(rows)), counts


def test_a_blank_optional_intermediate_label_is_its_none(tmp_path: Path) -> None:
    """The first row's gold run, which finds the intermediate fields, reads a blank `int |
    None` label (a CSV's empty cell) as None, as training does: `affected` is not an output."""
    from rich.console import Console

    from services.builder.context import BuildContext
    from services.builder.spec import load_spec

    rows = [{**row, "affected": "" if n % 2 == 0 else n} for n, row in
            enumerate(support_rows("train", 1))]  # fmt: skip
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "dev.jsonl", support_rows("dev", 1))
    (tmp_path / "spec.yaml").write_text(
        "name: estimate\nprogram: tests.programs.two_step:build_estimate_then_draft\n"
        f"data: {{train: train.jsonl, dev: dev.jsonl}}\noutput: {tmp_path / 'build'}\n"
    )
    ctx = BuildContext.load(load_spec(tmp_path / "spec.yaml"), Console(quiet=True))
    assert ctx.pipeline is not None and ctx.pipeline.output_names == ["reply"]
    assert [e.affected for e in ctx.trainset[:2]] == [None, 1]


def wrapped_context(folder: Path, factory: str, rows: list[dict[str, Any]]) -> Any:
    """The build's context (no stage run) of a tests/programs/wrapped.py program on `rows`."""
    from rich.console import Console

    from services.builder.context import BuildContext
    from services.builder.spec import load_spec

    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "dev.jsonl", rows)
    (folder / "spec.yaml").write_text(
        f"name: wrapped\nprogram: tests.programs.wrapped:{factory}\n"
        f"data: {{train: train.jsonl, dev: dev.jsonl}}\noutput: {folder / 'build'}\n"
    )
    return BuildContext.load(load_spec(folder / "spec.yaml"), Console(quiet=True))


def subject_rows(label: str = "category") -> list[dict[str, Any]]:
    """Support rows asked as a subject and a body; `affected`: an optional number, blank on
    the first row."""
    return [{"subject": "Help", "body": r["ticket"],
             label: r["category"] if label == "category" else n or ""}
            for n, r in enumerate(support_rows("train", 1))]  # fmt: skip


def test_one_predictor_in_a_module_of_its_own_is_served_through_its_forward(
    tmp_path: Path,
) -> None:
    """A module whose forward joins `subject` and `body` into the one predictor's `ticket`
    takes subject and body, as its author calls it, and its code is shipped; a wrapper taking
    `**kwargs` (no inputs of its own), or DSPy's Refine, is served from the predictor's
    signature, and the build says what of it is not served."""
    from services.builder.context import served_as_its_predictor
    from tests.programs.wrapped import build_refined

    ctx = wrapped_context(tmp_path, "build", subject_rows())
    assert ctx.pipeline is not None and ctx.pipeline.input_names == ["subject", "body"]
    assert ctx.pipeline.output_names == ["category"]
    assert "tests/programs/wrapped.py" in ctx.sources
    ctx = wrapped_context(tmp_path, "build_bare", support_rows("train", 1))
    assert ctx.pipeline is None and [f.name for f in ctx.program_spec.inputs] == ["ticket"]
    assert "Bare around one predictor" in (served_as_its_predictor(ctx.program) or "")
    # an optional output whose first row is None is still an output the program carries
    refined = served_as_its_predictor(build_refined()) or ""
    assert "Refine around one predictor" in refined and "retries" in refined
    assert served_as_its_predictor(ctx.program.predictors()[0]) is None  # a Predict is served whole
    ctx = wrapped_context(tmp_path, "build_estimate", subject_rows("affected"))
    assert ctx.pipeline is not None and ctx.pipeline.output_names == ["affected"]


def test_best_of_n_inside_a_module_is_traced_as_the_predictor_it_copies(tmp_path: Path) -> None:
    """dspy.BestOfN calls a copy of its predictor for each attempt: the calls are that
    predictor's (named by it in the traces) for a gold and an API teacher, and the runner the
    runtime serves with answers them."""
    from services.builder.spec import TeacherSpec
    from services.builder.teacher import collect_traces, gold_answers
    from services.core.pipeline import ProgramRunner
    from testkit.openai_standin import OpenAIStandIn

    rows = subject_rows()[:4]
    ctx = wrapped_context(tmp_path, "build_best_of", rows)
    assert ctx.pipeline is not None and [p.name for p in ctx.pipeline.predictors] == ["best.module"]

    def category_only(example: Any, prediction: Any, trace: Any = None) -> bool:
        return bool(example.category == prediction.category)

    def traced(teacher: TeacherSpec, out: Path) -> list[list[str]]:
        out.mkdir()
        runner = ProgramRunner(ctx.program.deepcopy(), ctx.pipeline)
        counts = collect_traces(
            program=ctx.program, teacher=teacher, trainset=ctx.trainset, metric=category_only,
            threshold=1.0, output_names=["category"], out_dir=out, runner=runner,
        )  # fmt: skip
        assert (counts.kept, counts.failed) == (len(ctx.trainset), 0)
        kept = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
        return [[call["predictor"] for call in row["calls"]] for row in kept]

    assert traced(TeacherSpec(model="gold"), tmp_path / "gold") == [["best.module"]] * len(rows)
    gold = {f"Help\n{r['body']}": r["category"] for r in rows}
    with OpenAIStandIn(gold) as api:
        teacher = TeacherSpec(model="openai/teacher", api_base=api.base_url, num_threads=1)
        assert traced(teacher, tmp_path / "api") == [["best.module"]] * len(rows)
    runner = ProgramRunner(ctx.program.deepcopy(), ctx.pipeline)
    served = runner.run({"subject": "Help", "body": rows[0]["body"]}, gold_answers(runner, rows[0]))
    assert served.outputs == {"category": rows[0]["category"]}


def test_a_program_written_async_only_is_traced_and_served_through_its_aforward(
    tmp_path: Path,
) -> None:
    """A module with an `aforward` and no `forward` (DSPy runs it with `acall`): its inputs
    are aforward's, its code ships, a gold and an API teacher trace it, and the runner the
    runtime serves with runs it, its calls reaching the run's Complete from the event loop."""
    import asyncio

    from services.builder.spec import TeacherSpec
    from services.builder.teacher import collect_traces, gold_answers
    from services.core.pipeline import ProgramRunner
    from testkit.openai_standin import OpenAIStandIn

    rows = subject_rows()[:4]
    ctx = wrapped_context(tmp_path, "build_async", rows)
    assert ctx.pipeline is not None and ctx.pipeline.input_names == ["subject", "body"]
    assert "tests/programs/wrapped.py" in ctx.sources

    def traced(teacher: TeacherSpec, out: Path) -> int:
        out.mkdir()
        runner = ProgramRunner(ctx.program.deepcopy(), ctx.pipeline)
        counts = collect_traces(
            program=ctx.program, teacher=teacher, trainset=ctx.trainset, metric=ctx.metric,
            threshold=1.0, output_names=["category"], out_dir=out, runner=runner,
        )  # fmt: skip
        assert counts.failed == 0, (out / "failed.jsonl").read_text()
        return counts.kept

    assert traced(TeacherSpec(model="gold"), tmp_path / "gold") == len(rows)
    gold = {f"Help\n{r['body']}": r["category"] for r in rows}
    with OpenAIStandIn(gold) as api:
        teacher = TeacherSpec(model="openai/teacher", api_base=api.base_url, num_threads=2)
        assert traced(teacher, tmp_path / "api") == len(rows)
    runner = ProgramRunner(ctx.program.deepcopy(), ctx.pipeline)
    for row in rows:
        served = runner.run({"subject": "Help", "body": row["body"]}, gold_answers(runner, row))
        assert served.outputs == {"category": row["category"]}
        assert [c.predictor for c in served.calls] == ["classify"]

    async def from_a_running_loop() -> Any:  # as a caller on an event loop would run it
        return runner.run({"subject": "Help", "body": rows[0]["body"]},
                          gold_answers(runner, rows[0]))  # fmt: skip

    assert asyncio.run(from_a_running_loop()).outputs == {"category": rows[0]["category"]}


@pytest.mark.parametrize("factory", ["build", "build_best_of"])
def test_a_call_is_sampled_as_the_program_asks(tmp_path: Path, factory: str) -> None:
    """BestOfN asks each attempt at temperature 1.0 so that they differ: the runtime's
    Complete samples such a call at 1.0, each on a seed of its own (the request's would make
    them the same); a call the program sets nothing for keeps the request's sampling."""
    import asyncio

    from services.builder.teacher import gold_answers
    from services.core.pipeline import ProgramRunner
    from services.core.sampling import GenerationParams
    from services.runtime.server import ProgramCalls

    rows = subject_rows()
    ctx = wrapped_context(tmp_path, factory, rows)
    assert ctx.pipeline is not None
    runner = ProgramRunner(ctx.program.deepcopy(), ctx.pipeline)
    billing = next(r for r in rows if r["category"] == "billing")  # the reward refuses it
    answer = gold_answers(runner, billing)
    sampled: list[tuple[float, int]] = []

    async def call(name: str, messages: Any, params: GenerationParams) -> tuple[Any, float]:
        sampled.append((params.temperature, params.seed))
        return answer(name, messages), 0.0

    async def run() -> Any:
        loop = asyncio.get_running_loop()
        request = GenerationParams(max_tokens=16, temperature=0.0, top_p=1.0, seed=7)
        inputs = {"subject": "Help", "body": billing["body"]}
        return await loop.run_in_executor(None, runner.run, inputs,
                                          ProgramCalls(loop, request, call))  # fmt: skip

    assert asyncio.run(run()).outputs == {"category": "billing"}
    if factory == "build":
        assert sampled == [(0.0, 7)]
    else:  # three attempts, none rewarded
        assert sampled == [(1.0, 8), (1.0, 9), (1.0, 10)]


def test_calls_a_program_runs_on_threads_belong_to_its_run() -> None:
    """Module.batch (dspy.Parallel) inside forward runs the predictor's calls on threads of
    its own: each call reaches the run's Complete (the runtime's, which runs them
    concurrently) and is listed in the run, and the answers come back in order. A call not
    answered there (which Module.batch catches, handing back None) leaves the run unparsed."""
    import asyncio
    import re

    from services.core.sampling import GenerationParams
    from services.runtime.server import ProgramCalls
    from tests.programs.wrapped import build_each_ticket

    module = build_each_ticket()
    spec = PipelineSpec(
        name="each", inputs=[FieldSpec(name="tickets", type="list[str]")],
        outputs=[FieldSpec(name="categories", type="list[str]")],
        predictors=predictor_specs(module),
        source=SourceSpec(module="tests.programs.wrapped", attr="build_each_ticket"),
    )  # fmt: skip
    runner = ProgramRunner(module, spec)
    labels = {"VPN down": "network", "Refund please": "billing", "Screen cracked": "hardware"}

    async def call(name: str, messages: Any, params: GenerationParams) -> tuple[LmCall, float]:
        ticket = re.findall(r"\[\[ ## ticket ## \]\]\n(.*)", messages[-1]["content"])[-1]
        await asyncio.sleep(0.05)  # the calls overlap
        if ticket.strip() not in labels:
            return LmCall(name, "I am not sure.", 0.0, "unparsed"), 0.0
        text = runner.codecs[name].format_assistant({"category": labels[ticket.strip()]})
        return LmCall(name, text, 0.9, "parsed", prompt_tokens=5, completion_tokens=2), 0.0

    async def run(tickets: list[str]) -> Any:
        loop = asyncio.get_running_loop()
        request = GenerationParams(max_tokens=16, temperature=0.0, top_p=1.0, seed=7)
        return await loop.run_in_executor(None, runner.run, {"tickets": tickets},
                                          ProgramCalls(loop, request, call))  # fmt: skip

    result = asyncio.run(run(list(labels)))
    assert json.loads(result.outputs_json) == {"categories": list(labels.values())}
    assert [c.predictor for c in result.calls] == ["classify"] * 3
    result = asyncio.run(run([*labels, "Printer on fire"]))
    assert result.outputs is None and result.outcome == "unparsed" and len(result.calls) == 4


def test_fields_the_programs_python_computes_are_in_the_response(tmp_path: Path) -> None:
    """A forward returning `queue` and `escalate` beside the predictor's `category`: the run
    (as the runtime and the router's fallback make it) carries them after the outputs, as text
    and typed, in the prediction's order."""
    from services.builder.teacher import gold_answers
    from services.core.pipeline import ProgramRunner

    rows = subject_rows()
    ctx = wrapped_context(tmp_path, "build_with_queue", rows)
    assert ctx.pipeline is not None and ctx.pipeline.output_names == ["category"]
    runner = ProgramRunner(ctx.program.deepcopy(), ctx.pipeline)
    row = next(r for r in rows if r["category"] == "security")
    result = runner.run({"subject": "Help", "body": row["body"]}, gold_answers(runner, row))
    assert result.outputs == {"category": "security", "queue": "team-security",
                              "escalate": "True"}  # fmt: skip
    assert json.loads(result.outputs_json) == {"category": "security", "queue": "team-security",
                                               "escalate": True}  # fmt: skip
    assert list(json.loads(result.outputs_json)) == ["category", "queue", "escalate"]


def load_project(project: Path, program: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The build's context for `program` in `project`, run from there, on a few support rows."""
    from rich.console import Console

    from services.builder.context import BuildContext
    from services.builder.spec import load_spec

    write_jsonl(project / "train.jsonl", support_rows("train", 1))
    write_jsonl(project / "dev.jsonl", support_rows("dev", 1))
    (project / "spec.yaml").write_text(
        f"name: project\nprogram: {program}\ndata: {{train: train.jsonl, dev: dev.jsonl}}\n"
    )
    monkeypatch.chdir(project)
    return BuildContext.load(load_spec(project / "spec.yaml"), Console(quiet=True))


OPTIMIZED_PROGRAM = """
from pathlib import Path

from tests.programs.two_step import TwoStep

TEAMS = (Path(__file__).parent / "teams.txt").read_text().split()  # read as it is imported
KEYS = Path(".env").read_text() if Path(".env").exists() else ""  # as load_dotenv(): not shipped


def build():
    program = TwoStep()
    program.load("optimized.json")  # what the optimizer found, saved where the build runs
    return program
"""


def test_files_the_programs_import_and_factory_read_ship_with_its_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A factory that load()s its optimized state from the working folder and a module that
    reads a file beside it at import: both files ship with the code, and the program is made
    from the bundle wherever the server runs."""

    from tests.programs.two_step import TwoStep

    project = tmp_path / "project"
    project.mkdir()
    (project / "optimized_two_step.py").write_text(OPTIMIZED_PROGRAM)
    (project / "teams.txt").write_text("network hardware software")
    (project / ".env").write_text("OPENAI_API_KEY=sk-not-a-real-key")
    optimized = TwoStep()
    optimized.classify.signature = optimized.classify.signature.with_instructions("Pick a team.")
    optimized.save(str(project / "optimized.json"))
    ctx = load_project(project, "optimized_two_step:build", monkeypatch)
    assert {"optimized_two_step.py", "optimized.json", "teams.txt"} <= set(ctx.sources)
    assert not {"train.jsonl", "spec.yaml", ".env"} & set(ctx.sources)  # not read by it, hidden
    program_json = ctx.write_program(tmp_path / "bundle" / "program")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "optimized_two_step")  # imported again, from the bundle
    runner = ProgramRunner.load(program_json, ctx.pipeline)
    assert runner.predictors["classify"].signature.instructions == "Pick a team."
    assert Path.cwd() == tmp_path
    shutil.rmtree(tmp_path / "bundle" / "program" / "source")
    (tmp_path / "bundle" / "program" / "source").mkdir()
    (tmp_path / "bundle" / "program" / "source" / "optimized_two_step.py").write_text(
        OPTIMIZED_PROGRAM.replace("TEAMS = ", "X = 1 #").replace("KEYS = ", "Y = 1 #")
    )
    monkeypatch.delitem(sys.modules, "optimized_two_step")
    with pytest.raises(ProgramCodeError, match=r"optimized_two_step:build raised "
                       r"FileNotFoundError: .*optimized\.json.* \(run in "):  # fmt: skip
        ProgramRunner.load(program_json, ctx.pipeline)


def test_a_program_saved_whole_ships_the_modules_its_pickle_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dspy.load("saved_program/", allow_pickle=True)` in the factory: the folder ships, and
    so does `steps.py`, which the pickle imports by name though no shipped module imports it."""
    from rich.console import Console

    from services.builder.context import BuildContext
    from services.builder.spec import load_spec

    project = tmp_path / "project"
    project.mkdir()
    (project / "steps.py").write_text(
        "from tests.programs.two_step import TwoStep\n\n\nclass Steps(TwoStep):\n    pass\n"
    )
    (project / "saved.py").write_text(
        'import dspy\n\n\ndef build():\n    return dspy.load("saved_program/", allow_pickle=True)\n'
    )
    monkeypatch.syspath_prepend(str(project))
    import steps  # type: ignore[import-not-found]

    steps.Steps().save(str(project / "saved_program"), save_program=True)
    write_jsonl(project / "train.jsonl", support_rows("train", 1))
    write_jsonl(project / "dev.jsonl", support_rows("dev", 1))
    (project / "spec.yaml").write_text(
        "name: saved\nprogram: saved:build\ndata: {train: train.jsonl, dev: dev.jsonl}\n"
    )
    monkeypatch.chdir(project)
    ctx = BuildContext.load(load_spec(project / "spec.yaml"), Console(quiet=True))
    assert {"saved.py", "steps.py", "saved_program/program.pkl"} <= set(ctx.sources)
    program_json = ctx.write_program(tmp_path / "bundle" / "program")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "saved")
    assert type(ProgramRunner.load(program_json, ctx.pipeline).module).__name__ == "Steps"


def two_step_context(folder: Path, factory: str, more_train: list[dict[str, str]] = ()) -> Any:
    """The build's context (no stage run) of a two-step program variant on support rows."""
    from rich.console import Console

    from services.builder.context import BuildContext
    from services.builder.spec import load_spec

    write_jsonl(folder / "train.jsonl", support_rows("train", 1) + list(more_train))
    write_jsonl(folder / "dev.jsonl", support_rows("dev", 1))
    (folder / "spec.yaml").write_text(
        f"name: variant\nprogram: tests.programs.two_step:{factory}\n"
        f"data: {{train: train.jsonl, dev: dev.jsonl}}\noutput: {folder / 'build'}\n"
    )
    return BuildContext.load(load_spec(folder / "spec.yaml"), Console(quiet=True))


def test_a_forward_parameter_with_a_default_is_an_optional_input(tmp_path: Path) -> None:
    """Rows and requests may leave out `tone` (forward's default is used); a missing ticket or
    an unknown field is still refused, naming it."""
    from services.core.validation import RpcFailure, predict_inputs

    ctx = two_step_context(tmp_path, "build_with_tone")
    assert ctx.pipeline is not None and ctx.pipeline.optional_inputs == ["tone"]
    fields = ctx.pipeline.inputs
    assert predict_inputs(pb.PredictRequest(inputs={"ticket": "VPN down"}), fields) == {
        "ticket": "VPN down"
    }
    assert predict_inputs(pb.PredictRequest(inputs={"ticket": "x", "tone": "kind"}), fields)
    for inputs, named in (({"tone": "kind"}, "inputs['ticket']"), ({"ticket": "x", "mood": "y"},
                          "inputs['mood']")):  # fmt: skip
        with pytest.raises(RpcFailure, match=re.escape(named)):
            predict_inputs(pb.PredictRequest(inputs=inputs), fields)


def test_a_typed_forward_parameter_is_checked_and_handed_over_typed(tmp_path: Path) -> None:
    """`max_words: int` (no predictor takes it) is an int input: "abc" is refused naming it,
    and `forward` gets 3, not "3", as it did from the row when the teacher ran."""
    from services.core.validation import RpcFailure, predict_inputs
    from tests.programs.two_step import build_with_length

    ctx = two_step_context(tmp_path, "build_with_length")
    assert ctx.pipeline is not None
    fields = ctx.pipeline.inputs
    assert [(f.name, f.type, f.required) for f in fields] == [
        ("ticket", "str", True), ("max_words", "int", False)]  # fmt: skip
    with pytest.raises(
        RpcFailure, match=re.escape("inputs['max_words']: 'abc' is not of type int")
    ):
        predict_inputs(pb.PredictRequest(inputs={"ticket": "x", "max_words": "abc"}), fields)
    runner = ProgramRunner(build_with_length(), ctx.pipeline)
    answers = {"classify": {"category": "network"}, "draft": {"reply": "We are on it now."}}
    result = runner.run({"ticket": "VPN down", "max_words": "3"}, scripted(runner, answers, []))
    assert result.outputs == {"category": "network", "reply": "We are on"}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A two-step program distilled with a short fine-tune; yields its build folder."""
    with scratch(tmp_path_factory, "two-step") as root:
        write_jsonl(root / "train.jsonl", support_rows("train", 4))
        write_jsonl(root / "dev.jsonl", support_rows("dev", 2))
        spec = root / "spec.yaml"
        spec.write_text(TWO_STEP_SPEC.format(program=PROGRAM, output=root / "build"))
        proc = subprocess.run(
            [sys.executable, "-m", "services.cli", "build", str(spec)],
            cwd=REPO, capture_output=True, text=True, timeout=1500,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
        assert "classify: 24 calls kept, 0 rejected" in proc.stdout
        yield root / "build"


@pytest.fixture(scope="module")
def served(built: Path) -> Iterator[ServerProcess]:
    server = start_runtime("--bundle", str(built / "bundle"), "--parallel", "4")
    yield server
    server.terminate()


def test_a_two_step_program_is_distilled_call_by_call_and_ships_its_source(built: Path) -> None:
    dataset = (built / "dataset" / "dataset.jsonl").read_text().splitlines()
    assert len(dataset) == 48  # 24 traces, two predictor calls each
    systems = {json.loads(line)["messages"][0]["content"] for line in dataset}
    assert len(systems) == 2  # each call prompted with its own predictor's signature

    bundle = Bundle.open(built / "bundle")  # every file, the source included, verified
    for rel in ("program/program.json", "program/state.json",
                "program/source/tests/programs/two_step.py",
                "program/source/tests/programs/signatures.py"):  # fmt: skip
        assert rel in bundle.manifest.files, rel
    program = json.loads((built / "bundle" / "program" / "program.json").read_text())
    assert (
        program["kind"] == "pipeline" and program["source"]["module"] == "tests.programs.two_step"
    )
    assert program["name"] == "two-step"  # the spec's, not a field's
    assert [p["name"] for p in program["predictors"]] == ["classify", "draft"]
    assert bundle.manifest.provenance["traces"]["predictors"]["draft"]["kept"] == 24

    evaluation = json.loads((built / "evaluate" / "eval.json").read_text())
    for model in [evaluation["teacher"], *evaluation["students"]]:
        assert set(model["fields"]) == {"category", "reply"}, model["label"]
        assert model["fields"]["reply"]["measure"] == "token F1"
    distilled = evaluation["students"][-1]
    assert all(e["lm_calls"] in (1, 2) for e in distilled["examples"])
    # Evaluated as served: each predictor's fixed prompt is kept evaluated, so a row's calls
    # reuse it though the other predictor's call came between (its latency is the runtime's).
    later = distilled["examples"][1:]
    assert all(e["cached_prompt_tokens"] > 50 * e["lm_calls"] for e in later), later
    assert "## Per field" in (built / "bundle" / "report.md").read_text()


def test_the_served_program_runs_both_predictors(built: Path, served: ServerProcess) -> None:
    ticket = {"ticket": "The VPN drops every hour, the whole team is blocked."}
    with InferenceClient(served.target) as client:
        info = client.info()
        reply = client.predict(ticket)
        chunks = list(client.predict_stream(ticket))
        with pytest.raises(grpc.RpcError) as missing:
            client.predict({"text": "no such field"})
    assert [p.name for p in info.predictors] == ["classify", "draft"]
    assert [f.name for f in info.signature.input_fields] == ["ticket"]
    assert [f.name for f in info.signature.output_fields] == ["category", "reply"]
    assert [f.name for f in info.predictors[1].signature.input_fields] == ["ticket", "category"]
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    assert reply.outcome == pb.PREDICT_OUTCOME_PARSED, reply.raw_text
    assert [c.predictor for c in reply.lm_calls] == ["classify", "draft"]
    # Each predictor's fixed prompt is held evaluated (--parallel 4): its calls reuse it.
    assert all(c.usage.cached_prompt_tokens > 50 for c in reply.lm_calls), reply.lm_calls
    assert info.cached_prefix_tokens >= sum(c.usage.cached_prompt_tokens for c in reply.lm_calls)
    assert reply.usage.prompt_tokens == sum(c.usage.prompt_tokens for c in reply.lm_calls)
    assert reply.usage.completion_tokens == sum(c.usage.completion_tokens for c in reply.lm_calls)
    assert reply.confidence == pytest.approx(min(c.confidence for c in reply.lm_calls))
    assert reply.outputs["category"] and reply.outputs["reply"]
    # Streamed: each step's values as written, in the order the steps ran, then the answer.
    written: dict[tuple[str, str], str] = {}
    for chunk in chunks[:-1]:
        key = (chunk.delta.predictor, chunk.delta.field)
        written[key] = written.get(key, "") + chunk.delta.text
    assert list(written) == [("classify", "category"), ("draft", "reply")]
    assert written[("draft", "reply")] == reply.outputs["reply"]
    assert dict(chunks[-1].response.outputs) == dict(reply.outputs)
    assert not list((built / "bundle").rglob("__pycache__"))  # the signed bundle stays as built


def in_process_answers(
    gguf: Path, tickets: list[str], prompt_format: PromptFormat
) -> list[dict[str, str] | None]:
    """The same program run by DSPy itself, in this process, on llama-cpp-python (the model
    samples the whole answer: no typed decoding)."""
    import dspy

    from services.builder.dspy_integration import LlamaCppEngine
    from services.core.pipeline import served_adapter
    from tests.programs.two_step import build

    engine = LlamaCppEngine(n_ctx=4096, n_threads=2)
    lm = dspy.LM(f"llamacpp/{gguf}", engine=engine, temperature=0.0, max_tokens=48, cache=False)
    program = build()
    program.set_lm(lm)
    answers: list[dict[str, str] | None] = []
    try:
        for ticket in tickets:
            try:
                with dspy.context(adapter=served_adapter(prompt_format)):
                    prediction = program(ticket=ticket)
            except dspy.utils.exceptions.AdapterParseError:
                answers.append(None)
                continue
            answers.append({k: str(prediction[k]) for k in ("category", "reply")})
    finally:
        engine.close()
    return answers


def test_served_answers_equal_dspy_in_process_and_concurrent_equal_serial(
    built: Path, served: ServerProcess
) -> None:
    tickets = [json.loads(line)["ticket"] for line in
               (SUPPORT / "dev.jsonl").read_text().splitlines()[:12]]  # fmt: skip

    def answer(client: InferenceClient, ticket: str) -> dict[str, str] | None:
        reply = client.predict({"ticket": ticket}, max_tokens=48)
        return dict(reply.outputs) if reply.outcome == pb.PREDICT_OUTCOME_PARSED else None

    with InferenceClient(served.target) as client:
        serial = [answer(client, t) for t in tickets]
        with ThreadPoolExecutor(len(tickets)) as pool:
            concurrent = list(pool.map(lambda t: answer(client, t), tickets))
    assert concurrent == serial
    bundle = Bundle.open(built / "bundle")
    prompt_format = read_program_file(bundle.program_path).prompt_format
    assert prompt_format == "prefix-first"
    untyped = start_runtime("--bundle", str(built / "bundle"), "--no-typed-decoding")
    try:
        with InferenceClient(untyped.target) as client:
            sampled_whole = [answer(client, t) for t in tickets]
    finally:
        untyped.terminate()
    assert in_process_answers(bundle.model_path(), tickets, prompt_format) == sampled_whole

    # One call at a time (the default): each predictor's fixed prompt is restored, not
    # evaluated again, although the calls alternate predictors; the answers are the same.
    one_at_a_time = start_runtime("--bundle", str(built / "bundle"))
    try:
        with InferenceClient(one_at_a_time.target) as client:
            assert [answer(client, t) for t in tickets] == serial
            calls = client.predict({"ticket": tickets[0]}, max_tokens=48).lm_calls
    finally:
        one_at_a_time.terminate()
    assert len(calls) == 2 and all(c.usage.cached_prompt_tokens > 50 for c in calls), calls
    assert sum(a is not None for a in serial) >= 4, serial  # the comparison is of real answers


def edited_program(built: Path, tmp_path: Path, old: str, new: str) -> Path:
    """The bundle's program folder, copied and its source edited (served with --program)."""
    folder = tmp_path / "program"
    shutil.copytree(built / "bundle" / "program", folder)
    source = folder / "source" / "tests" / "programs" / "two_step.py"
    text = source.read_text()
    assert old in text
    source.write_text(text.replace(old, new))
    return folder / "program.json"


def test_a_program_importing_a_missing_module_fails_the_start_naming_it(
    built: Path, tmp_path: Path
) -> None:
    program = edited_program(built, tmp_path, "import dspy\n", "import dspy\nimport acme_nlp\n")
    gguf = Bundle.open(built / "bundle").model_path()
    failed = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "--model", str(gguf), "--program",
         str(program), "--port", "0", "--metrics-port", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert failed.returncode != 0
    assert "'acme_nlp'" in failed.stderr and "not installed" in failed.stderr


def test_a_forward_that_raises_is_internal_and_the_next_call_is_served(
    built: Path, tmp_path: Path
) -> None:
    raising = (
        "        category = self.classify(ticket=ticket).category\n"
        "        if 'explode' in ticket:\n"
        "            raise ValueError(f'cannot handle {ticket!r}')\n"
    )
    program = edited_program(
        built, tmp_path, "        category = self.classify(ticket=ticket).category\n", raising
    )
    gguf = Bundle.open(built / "bundle").model_path()
    server = start_runtime("--model", str(gguf), "--program", str(program))
    try:
        with InferenceClient(server.target) as client:
            with pytest.raises(grpc.RpcError) as failed:
                client.predict({"ticket": "please explode"})
            request = pb.PredictRequest(inputs={"ticket": "The printer is jammed again."})
            with pytest.raises(grpc.RpcError) as late:  # the deadline holds inside forward
                client.stub.Predict(request, timeout=0.05)
            after = client.predict({"ticket": "My laptop battery is swollen."})
    finally:
        server.terminate()
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert "ValueError: cannot handle 'please explode'" in (failed.value.details() or "")
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(after.lm_calls) >= 1


def test_a_low_confidence_answer_falls_back_to_the_whole_program_on_the_api(
    built: Path, served: ServerProcess
) -> None:
    from testkit.openai_standin import OpenAIStandIn

    ticket = "Someone logged in to my account from another country."
    with OpenAIStandIn({ticket: "security"}) as api:
        router = start_router(built / "bundle", served.target, "--threshold", "1.01",
                              "--fallback-model", "openai/teacher",
                              "--fallback-api-base", api.base_url)  # fmt: skip
        try:
            with InferenceClient(router.target) as client:
                reply = client.predict({"ticket": ticket})
                requests = api.requests
                chunks = list(client.predict_stream({"ticket": ticket}))
        finally:
            router.terminate()
    assert reply.served_by == pb.SERVED_BY_FALLBACK and reply.route_reason == "low_confidence"
    # streamed: after the restart, each step's values as the API writes them, step by step
    kinds = [c.WhichOneof("chunk") for c in chunks]
    api_deltas = [c.delta for c in chunks[kinds.index("restart") + 1 : -1]]
    assert all(d.served_by == pb.SERVED_BY_FALLBACK for d in api_deltas)
    written: dict[tuple[str, str], str] = {}
    for delta in api_deltas:
        key = (delta.predictor, delta.field)
        written[key] = written.get(key, "") + delta.text
    assert list(written) == [("classify", "category"), ("draft", "reply")]
    assert chunks[-1].response.outputs == reply.outputs
    assert list(written.values()) == [reply.outputs["category"], reply.outputs["reply"]]
    # Both predictors ran on the API (the stand-in labels the category and, asked for any
    # other field, writes a fixed sentence): the program's own forward, not one signature.
    assert dict(reply.outputs) == {"category": "security", "reply": "Answer precisely and briefly."}
    assert requests == 2
    # each API call listed with the tokens the API counted; `usage` their sum
    assert [c.predictor for c in reply.lm_calls] == ["classify", "draft"]
    assert all(c.usage.prompt_tokens > 0 < c.usage.completion_tokens for c in reply.lm_calls)
    assert reply.usage.prompt_tokens == sum(c.usage.prompt_tokens for c in reply.lm_calls)


def test_a_label_the_programs_python_writes_may_be_outside_the_predictors_type(
    tmp_path: Path,
) -> None:
    """`category: none` on a row whose forward never asks the classifier is the program's own
    answer, not a label the model could never give: the build takes it as written. On a row
    the classifier answers, the same value is still refused, naming the row."""
    from services.builder.spec import SpecError

    spam = {"ticket": "SPAM win a cruise", "category": "none", "reply": "", "group": "spam"}
    ctx = two_step_context(tmp_path, "build_skips_spam", [spam])
    assert [e.category for e in ctx.trainset if e.ticket.startswith("SPAM")] == ["none"]
    wrong = {**spam, "ticket": "my VPN is down"}
    with pytest.raises(SpecError, match=r"train.jsonl line \d+: category 'none' is not a value"):
        two_step_context(tmp_path, "build_skips_spam", [wrong])


def test_gold_refuses_a_predictor_called_on_two_inputs_in_one_row(tmp_path: Path) -> None:
    """The row has one `category` label; a program that classifies two texts per row would
    have both calls taught it. The traces stage says so and points to an API teacher."""
    from rich.console import Console

    from services.builder.pipeline import STAGES, build
    from services.builder.spec import load_spec
    from services.builder.teacher import TeacherError

    ctx = two_step_context(tmp_path, "build_asks_twice")
    assert ctx.pipeline is not None
    with pytest.raises(TeacherError, match=r"calls it 2 times on different inputs.*API teacher"):
        build(load_spec(tmp_path / "spec.yaml"), Console(file=io.StringIO()), stages=STAGES[:1])


PYTHON_DATA_PROGRAM = """
import json
from pathlib import Path

import dspy

from tests.programs.two_step import TwoStep

TEAMS = (Path(__file__).parent / "teams.txt").read_text().split()  # read as it is imported
ROWS = [json.loads(line) for line in Path("rows.jsonl").read_text().splitlines()]
trainset = [dspy.Example(**row).with_inputs("ticket") for row in ROWS[:6]]


def devset():
    return [dict(row) for row in ROWS[6:]]


def build():
    return TwoStep()
"""


def test_rows_a_dspy_user_keeps_in_python_are_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`data.train: "module:trainset"` (a list of dspy.Example) and `data.dev: "module:devset"`
    (a function returning dicts) are read in their order, written once as JSONL under the build
    folder; taking them from the program's own module still ships the files it reads at import.
    What is not rows is refused naming the key and what to write."""
    from rich.console import Console

    from services.builder.context import BuildContext
    from services.builder.spec import SpecError, load_spec

    project = tmp_path / "project"
    project.mkdir()
    (project / "python_data_program.py").write_text(PYTHON_DATA_PROGRAM)
    (project / "teams.txt").write_text("network hardware software")
    rows = support_rows("train", 1) + support_rows("dev", 1)
    write_jsonl(project / "rows.jsonl", rows)
    (project / "spec.yaml").write_text(
        "name: pydata\nprogram: python_data_program:build\n"
        "data: {train: 'python_data_program:trainset', dev: 'python_data_program:devset'}\n"
    )
    monkeypatch.chdir(project)
    spec = load_spec(project / "spec.yaml")
    assert spec.data.train == Path("build/pydata/data/train.jsonl")
    assert [json.loads(line) for line in spec.data.train.read_text().splitlines()] == rows[:6]
    assert [json.loads(line) for line in spec.data.dev.read_text().splitlines()] == rows[6:]
    ctx = BuildContext.load(spec, Console(quiet=True))
    assert [row.ticket for row in ctx.trainset] == [row["ticket"] for row in rows[:6]]
    # The module reads both as it is imported, as the runtime will import it: both ship.
    assert {"python_data_program.py", "teams.txt", "rows.jsonl"} <= set(ctx.sources)
    (project / "spec.yaml").write_text(
        "name: pydata\nprogram: python_data_program:build\n"
        "data: {train: 'python_data_program:TEAMS', dev: 'python_data_program:nothing'}\n"
    )
    with pytest.raises(SpecError, match=r"data.train: python_data_program:TEAMS item 1 is a "
                       r"str; a row is a dspy.Example"):  # fmt: skip
        load_spec(project / "spec.yaml")


PROGRAM_WITH_PACKAGES = """
import json

import safetensors  # a package of the build's environment that serving lacks
import yaml  # one serving has (edgedistill reads YAML)

from answer_helpers import tidy
from tests.programs.two_step import TwoStep


def build():
    return TwoStep()
"""


def test_packages_the_programs_code_imports_beyond_serving_are_required_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multi-step program importing a package the serving images lack: program.json names it
    pinned to the build's version (not the standard library, not its own modules, not what
    edgedistill serves with), and a runtime without it refuses to start, naming the install."""
    from importlib import metadata

    project = tmp_path / "project"
    project.mkdir()
    (project / "packaged_program.py").write_text(PROGRAM_WITH_PACKAGES)
    (project / "answer_helpers.py").write_text("def tidy(text):\n    return text.strip()\n")
    ctx = load_project(project, "packaged_program:build", monkeypatch)
    assert ctx.pipeline is not None
    assert ctx.pipeline.requires == [f"safetensors=={metadata.version('safetensors')}"]
    program_json = ctx.write_program(tmp_path / "bundle" / "program")
    assert ProgramRunner.load(program_json, ctx.pipeline).predictors  # installed here: it starts
    elsewhere = ctx.pipeline.model_copy(update={"requires": ["surely-not-installed==1.0"]})
    with pytest.raises(ProgramCodeError, match=r"program: its code imports "
                       r"surely-not-installed==1.0, not installed here; pip install "
                       r"'surely-not-installed==1.0' beside edgedistill"):  # fmt: skip
        ProgramRunner.load(program_json, elsewhere)


ATLAS_AGENT = '''
import dspy

ATLAS = {"France": "Paris", "Peru": "Lima", "Kenya": "Nairobi", "Japan": "Tokyo"}


def lookup_capital(country: str) -> str:
    """Return the capital city of a country, from the atlas."""
    return ATLAS.get(country.strip(), "unknown")


def build():
    agent = dspy.ReAct("question -> answer", tools=[lookup_capital], max_iters=3)
    looked_up = "[[ ## thought_0 ## ]]\\nLook it up.\\n\\n[[ ## tool_name_0 ## ]]\\nlookup_capital"
    agent.react.demos = [  # as an optimizer leaves them: one step of each kind
        dspy.Example(question="What is the capital of Japan?", trajectory="",
                     next_thought="Look it up.", next_tool_name="lookup_capital",
                     next_tool_args={"country": "Japan"}),
        dspy.Example(question="What is the capital of Kenya?",
                     trajectory=looked_up + "\\n\\n[[ ## observation_0 ## ]]\\nNairobi",
                     next_thought="The atlas answered.", next_tool_name="finish",
                     next_tool_args={}),
    ]
    return agent
'''


def test_a_react_agent_ships_its_code_and_each_served_step_is_a_valid_tool_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gguf_path: Path
) -> None:
    """DSPy's ReAct with its optimized demos, its tool a function of the program's code: the
    code ships in program.json's folder, and served even by the untuned model each step is a
    valid tool call (typed decoding: the tool's name one of the tools or `finish`, its
    arguments a JSON object), so the loop runs on the runtime and the answer parses; the
    trajectory comes back with the outputs. (The untuned model finishes at once: whether a
    distilled agent calls its tool well is not what this tests.)"""
    from rich.console import Console

    from services.builder.context import BuildContext
    from services.builder.spec import load_spec

    project = tmp_path / "project"
    project.mkdir()
    (project / "atlas_agent.py").write_text(ATLAS_AGENT)
    rows = [{"question": f"What is the capital of {c}?", "answer": a}
            for c, a in (("France", "Paris"), ("Peru", "Lima"), ("Kenya", "Nairobi"))]  # fmt: skip
    write_jsonl(project / "train.jsonl", rows[:2])
    write_jsonl(project / "dev.jsonl", rows)
    (project / "spec.yaml").write_text(
        "name: atlas\nprogram: atlas_agent:build\ndata: {train: train.jsonl, dev: dev.jsonl}\n"
        "teacher: {model: openai/teacher, api_base: 'http://127.0.0.1:9/v1'}\n"
    )
    monkeypatch.chdir(project)
    ctx = BuildContext.load(load_spec(project / "spec.yaml"), Console(quiet=True))
    assert ctx.pipeline is not None and ctx.pipeline.input_names == ["question"]
    assert "atlas_agent.py" in ctx.sources
    program_json = ctx.write_program(tmp_path / "bundle" / "program")
    monkeypatch.chdir(tmp_path)
    server = start_runtime("--model", str(gguf_path), "--program", str(program_json),
                           "--n-ctx", "4096")  # fmt: skip
    try:
        with InferenceClient(server.target, timeout_s=600) as client:
            reply = client.predict({"question": "What is the capital of Peru?"})
    finally:
        server.terminate()
    assert reply.outcome == pb.PREDICT_OUTCOME_PARSED, reply.raw_text
    calls = [call.predictor for call in reply.lm_calls]
    assert calls[0] == "react" and calls[-1] == "extract.predict", calls
    trajectory = json.loads(reply.outputs_json)["trajectory"]
    for step in range(calls.count("react")):
        assert trajectory[f"tool_name_{step}"] in ("lookup_capital", "finish")
        assert isinstance(trajectory[f"tool_args_{step}"], dict)
        assert f"observation_{step}" in trajectory  # the step ran (the tool, or finish)
