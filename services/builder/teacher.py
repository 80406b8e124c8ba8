"""Stage 1, traces: run the teacher over the train set and keep what passes the metric.

DSPy's BootstrapFinetune crashes on one teacher failure and lets every float score through its
filter; here a failure on one example is counted and skipped, and the score is compared to a
threshold. Fatal only when failures pass `teacher.max_failure_fraction`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.builder.data import json_line
from services.builder.metrics import Metric, score
from services.builder.spec import SpecError, TeacherSpec
from services.core.lm_connection import connection
from services.core.pipeline import (
    Complete,
    LmCall,
    ProgramRunner,
    call_program,
    unbound_predictor_message,
)
from services.core.program import blank_as_none


class TeacherError(RuntimeError):
    """Too many teacher failures to build from."""


@dataclass
class TraceCounts:
    total: int
    kept: int
    rejected: int
    failed: int


def teacher_lm(teacher: TeacherSpec, *, name_suffix: str = "") -> Any:
    """A dspy.LM for the teacher; the key comes from the environment variable the spec names."""
    import dspy

    kwargs: dict[str, Any] = {
        "temperature": teacher.temperature,
        "max_tokens": teacher.max_tokens,
        "cache": False,  # DSPy's cache key ignores api_base: never serve one teacher's answers
        "num_retries": 2,
    }
    key = None
    if teacher.api_key_env:
        key = os.environ.get(teacher.api_key_env)
        if not key:
            raise SpecError(
                f"teacher.api_key_env: environment variable {teacher.api_key_env} is not set"
            )
    kwargs.update(connection(teacher.model, teacher.api_base, key))
    return dspy.LM(teacher.model, **kwargs)


def teacher_program_on(program: Any, teacher: TeacherSpec) -> Any:
    """A copy of the user's program, every predictor on the teacher LM."""
    teacher_program = program.deepcopy()
    teacher_program.set_lm(teacher_lm(teacher))
    return teacher_program


def make_teacher(
    program: Any, teacher: TeacherSpec, trainset: list[Any], metric: Metric, threshold: float
) -> Any:
    """The teacher program: the user's program on the teacher LM, optionally prompt-optimized.
    A bootstrapped demo must reach the metric threshold, as a kept trace must (DSPy's own
    filter is truthiness: any non-zero float score would pass)."""
    import dspy

    teacher_program = teacher_program_on(program, teacher)
    lm = teacher_program.get_lm()
    # The optimizers run copies whose LM was reset: the teacher LM is the context's.
    with dspy.context(lm=lm):
        if teacher.optimize == "bootstrap_fewshot":
            optimizer = dspy.BootstrapFewShot(
                metric=metric, metric_threshold=threshold, max_bootstrapped_demos=4
            )
            teacher_program = optimizer.compile(teacher_program, trainset=trainset[:50])
        elif teacher.optimize == "mipro_light":
            optimizer = dspy.MIPROv2(metric=metric, auto="light", num_threads=teacher.num_threads)
            teacher_program = optimizer.compile(teacher_program, trainset=trainset)
    teacher_program.set_lm(lm)
    return teacher_program


Verdict = tuple[str, dict[str, Any]]  # "kept", "rejected" or "failed", and the row's record


def collect_traces(
    *,
    program: Any,
    teacher: TeacherSpec,
    trainset: list[Any],
    metric: Metric,
    threshold: float,
    output_names: list[str],
    out_dir: Path,
    runner: ProgramRunner | None = None,
    progress: Callable[[int], None] = lambda n: None,
    require_kept: bool = True,
) -> TraceCounts:
    """Writes traces.jsonl (kept: inputs + outputs, and a multi-step program's predictor
    calls), rejected.jsonl, failed.jsonl, counts.json."""
    if teacher.is_gold and runner is None:
        verdicts: Iterable[Verdict] = (("kept", gold_record(e)) for e in trainset)
    else:
        answer, names = teacher_answers(program, teacher, trainset, metric, threshold, runner)
        run = traced_run(answer, names, program.predictors()[0], metric, threshold,
                         output_names, runner)  # fmt: skip
        verdicts = run_all(run, trainset, teacher.num_threads)
    rows: dict[str, list[dict[str, Any]]] = {"kept": [], "rejected": [], "failed": []}
    for verdict, record in verdicts:
        rows[verdict].append(record)
        progress(1)
    if teacher.is_gold and runner is not None:
        check_one_label_per_call(rows["kept"] + rows["rejected"])
    counts = write_traces(out_dir, rows, runner, total=len(trainset))
    check_counts(counts, rows["failed"], teacher, out_dir, require_kept)
    return counts


def gold_record(example: Any) -> dict[str, Any]:
    """A single predictor's trace from gold labels: the row itself."""
    return {"inputs": dict(example.inputs()), "outputs": dict(example.labels())}


def traced_run(
    answer: Callable[[Any], Any], names: dict[str, Any], single: Any, metric: Metric,
    threshold: float, output_names: list[str], runner: ProgramRunner | None,
) -> Callable[[Any], Verdict]:  # fmt: skip
    """The teacher's run on one row, traced and scored; a failure is the row's, never the
    build's."""

    def run(example: Any) -> Verdict:
        import dspy

        inputs = dict(example.inputs())
        try:
            with dspy.context(trace=[]):
                prediction = answer(example)
                trace = list(dspy.settings.trace)
        except Exception as err:  # one bad example never sinks the build
            error = f"{type(err).__name__}: {err}"[:500]
            return "failed", {"inputs": inputs, "error": error, "every_call": every_call(err)}
        if runner is None:
            call = own_call(trace, single)
            if isinstance(call, str):
                return "failed", {"inputs": inputs, "error": call}
            _, inputs, prediction = call
        calls = named_calls(trace, names) if runner is not None else []
        if isinstance(calls, str):
            return "failed", {"inputs": inputs, "error": calls}
        outputs = {k: prediction.get(k) for k in output_names}
        value = score(metric, example, outputs)
        record = {"inputs": dict(inputs), "outputs": outputs, "score": value}
        if runner is not None:
            record["calls"] = calls
        return ("kept" if value >= threshold else "rejected"), record

    return run


def run_all(run: Callable[[Any], Verdict], trainset: list[Any], threads: int) -> Iterator[Verdict]:
    """Every row's verdict, the first alone: an error every call would meet (no connection, a
    bad key) stops the build then, not after the whole train set has failed with retries."""
    if not trainset:
        return
    first = run(trainset[0])
    if first[0] == "failed" and first[1].get("every_call"):
        said = first[1]["error"].split("\n\n")[0].rstrip(".")  # not DSPy's advice on dspy.LM()
        raise TeacherError(
            f"the teacher's first call failed: {said}; nothing else was sent. Check "
            "teacher.model, teacher.api_base and teacher.api_key_env (the name of the "
            "environment variable that holds the key)"
        )
    yield first
    with ThreadPoolExecutor(max_workers=threads) as pool:
        yield from pool.map(run, trainset[1:])


def write_traces(
    out_dir: Path, rows: dict[str, list[dict[str, Any]]], runner: ProgramRunner | None,
    total: int,
) -> TraceCounts:  # fmt: skip
    """traces.jsonl (the kept rows), rejected.jsonl, failed.jsonl and counts.json."""
    counts = TraceCounts(total, len(rows["kept"]), len(rows["rejected"]), len(rows["failed"]))
    for name, verdict in (("traces", "kept"), ("rejected", "rejected"), ("failed", "failed")):
        with (out_dir / f"{name}.jsonl").open("w") as handle:
            for row in rows[verdict]:
                handle.write(json_line(row))
    summary = asdict(counts)
    if runner is not None:
        summary["predictors"] = predictor_counts(rows["kept"], rows["rejected"],
                                                 list(runner.predictors))  # fmt: skip
    (out_dir / "counts.json").write_text(json.dumps(summary, indent=2))
    return counts


def check_counts(
    counts: TraceCounts, failed: list[dict[str, Any]], teacher: TeacherSpec, out_dir: Path,
    require_kept: bool,
) -> None:  # fmt: skip
    """Too many failures, or nothing kept, is the build's error, said with where to look."""
    if counts.failed > teacher.max_failure_fraction * counts.total:
        first = failed[0]["error"] if failed else ""
        raise TeacherError(
            f"the teacher failed on {counts.failed} of {counts.total} examples, over "
            f"teacher.max_failure_fraction={teacher.max_failure_fraction} "
            f"({out_dir / 'failed.jsonl'} has each){unparsed_advice(failed)}; first error: "
            f"{first}"
        )
    if counts.kept == 0 and require_kept:
        raise TeacherError(
            f"no teacher trace passed the metric ({counts.rejected} rejected, {counts.failed} "
            "failed): check the teacher model, the metric, or lower metric_threshold"
        )


def own_call(trace: list[Any], predictor: Any) -> Any:
    """The one call of a single-predictor program's predictor in a teacher run's trace (not
    Refine's advice, say), or what is wrong."""
    own = [call for call in trace if same_fields(call[0], predictor)]
    return own[0] if len(own) == 1 else f"{len(own)} calls of the program's predictor, want 1"


def named_calls(trace: list[Any], named: dict[str, Any]) -> list[dict[str, Any]] | str:
    """A multi-step program's calls, each by its predictor's name; or what is wrong: a call of
    a predictor made as forward ran, which no student learns and nothing serves."""
    names = [predictor_name(predictor, named) for predictor, _, _ in trace]
    if None in names:
        unbound = trace[names.index(None)][0]
        return unbound_predictor_message(list(unbound.signature.output_fields))
    return [{"predictor": name, "inputs": dict(inputs), "outputs": dict(outputs.items())}
            for name, (_, inputs, outputs) in zip(names, trace, strict=True)]  # fmt: skip


def predictor_name(called: Any, named: dict[str, Any]) -> str | None:
    """The name of the program's predictor a traced call was made by: the predictor itself, or
    a copy of it made as the program ran, as BestOfN and Refine copy their module for each
    attempt (the copy keeps the predictor's signature and has its LM set, which a predictor
    made in forward lacks); None for a predictor of neither kind, or a copy that could be
    of two predictors sharing one signature."""
    same = [name for name, p in named.items() if p is called]
    if not same and getattr(called, "lm", None) is not None:
        same = [name for name, p in named.items() if p.signature is called.signature]
    return same[0] if len(same) == 1 else None


def same_fields(called: Any, predictor: Any) -> bool:
    """A traced predictor is the program's own, or a copy of it (an optimizer's, Refine's
    attempts): the same input and output fields."""
    ours, theirs = predictor.signature, called.signature
    return bool(
        list(ours.input_fields) == list(theirs.input_fields)
        and list(ours.output_fields) == list(theirs.output_fields)
    )


def every_call(err: Exception) -> bool:
    """An error no other call would escape: the server unreachable, the key or the billing
    refused, the model unknown or the client misconfigured (not a rate limit, a timeout or one
    answer that did not parse)."""
    from dspy.utils import exceptions as lm

    fatal = (lm.LMTransportError, lm.LMAuthError, lm.LMBillingError, lm.LMConfigurationError,
             lm.LMUnsupportedModelError)  # fmt: skip
    return isinstance(err, fatal)


def teacher_answers(
    program: Any, teacher: TeacherSpec, trainset: list[Any], metric: Metric, threshold: float,
    runner: ProgramRunner | None,
) -> tuple[Callable[[Any], Any], dict[str, Any]]:  # fmt: skip
    """How the teacher answers a train row (its predictions traced), and the predictors it
    traces by name. Gold runs a multi-step program with every predictor answering the
    row's labelled values for its output fields."""
    if teacher.is_gold:
        assert runner is not None
        return lambda example: gold_run(runner, example), dict(runner.predictors)
    teacher_program = make_teacher(program, teacher, trainset, metric, threshold)
    return answering(teacher_program, runner), dict(teacher_program.named_predictors())


def answering(teacher_program: Any, runner: ProgramRunner | None) -> Callable[[Any], Any]:
    """The teacher program's prediction on a row, its inputs typed as served."""
    import dspy

    typed = runner.forward_arguments if runner is not None else dict

    def answer(example: Any) -> Any:
        # The teacher LM is also the context's, as `dspy.configure(lm=...)` makes it where the
        # program was written: a predictor made as it runs (Refine's advice) calls it too.
        with dspy.context(lm=teacher_program.get_lm()):
            return call_program(teacher_program, typed(dict(example.inputs())))

    return answer


def ask_once(program: Any, teacher: TeacherSpec, example: Any, runner: ProgramRunner | None) -> Any:
    """The API teacher's prediction on one row, as a traced run asks it (not optimized), or
    what went wrong with that row (an answer that did not parse, which a build counts and
    goes on from). An error every call would meet (no server, a refused key) is raised."""
    try:
        return answering(teacher_program_on(program, teacher), runner)(example)
    except Exception as err:
        said = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"
        if every_call(err):
            raise TeacherError(f"{teacher.model} cannot be asked: {said}") from err
        return said


def gold_answers(runner: ProgramRunner, row: Any) -> Complete:
    """Each predictor's call answered with the row's labels for its output fields."""

    def complete(name: str, messages: list[dict[str, str]]) -> LmCall:
        codec = runner.codecs[name]
        types = codec.signature.output_fields
        text = codec.format_assistant(
            {k: blank_as_none(row[k], types[k].annotation) for k in codec.output_names}
        )
        return LmCall(predictor=name, text=text, confidence=1.0, outcome="parsed")

    return complete


def gold_run(runner: ProgramRunner, example: Any) -> Any:
    """The program's forward on one row, each predictor answering the row's labels."""
    import dspy

    result = runner.run(dict(example.inputs()), gold_answers(runner, example))
    if result.outputs is None:
        raise ValueError("a gold answer did not parse")
    return dspy.Prediction(**json.loads(result.outputs_json))  # typed, as an API teacher's


def check_one_label_per_call(records: list[dict[str, Any]]) -> None:
    """A gold teacher answers a predictor's every call in a row with the row's one label: a
    predictor the program calls more than once on different inputs (once per item of a list)
    would be taught the same answer for all of them."""
    for record in records:
        asked: dict[str, list[dict[str, Any]]] = {}
        for call in record.get("calls", []):
            asked.setdefault(call["predictor"], []).append(call["inputs"])
        for name, inputs in asked.items():
            if len({json_line(i) for i in inputs}) > 1:
                raise TeacherError(
                    f"gold answers predictor {name!r} from the row's labels, but the program "
                    f"calls it {len(inputs)} times on different inputs for one row (inputs "
                    f"{record['inputs']}): every call would be taught the same answer. Use an "
                    "API teacher (teacher.model), which answers each call"
                )


def predictor_counts(
    kept: list[dict[str, Any]], rejected: list[dict[str, Any]], names: list[str]
) -> dict[str, dict[str, int]]:
    """Each predictor's calls in kept and in rejected traces."""

    def calls(rows: list[dict[str, Any]], name: str) -> int:
        return sum(c["predictor"] == name for row in rows for c in row.get("calls", []))

    return {name: {"kept": calls(kept, name), "rejected": calls(rejected, name)} for name in names}


def unparsed_advice(failed: list[dict[str, Any]]) -> str:
    """What to do when most teacher calls failed because the answers did not parse: the model
    cannot follow the program's output format, and retrying it will not help."""
    unparsed = sum("AdapterParseError" in str(row.get("error", "")) for row in failed)
    if not failed or unparsed * 2 < len(failed):
        return ""
    return (
        f"; {unparsed} of them answered in a form the program's output fields do not "
        "parse: use a stronger teacher model, or `teacher: gold` with every output "
        "labelled in the rows"
    )
