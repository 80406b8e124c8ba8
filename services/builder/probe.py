"""Rows the model in training answers greedily, scored as the evaluation scores them.

Two uses: choosing the checkpoint on the calibration part (never the test part), and each
output field's accuracy on a sample of train rows when training ends, so that a low loss that
only means "learned the output format" shows as what it is. As in serving, the field headers
are written for the model and it writes the values, a choice (Literal, Enum, bool) only one of
its values; unlike serving, numbers and JSON are sampled without their types' constraints.
"""

from __future__ import annotations

import random
import statistics
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from services.builder.metrics import Metric, field_matches, score
from services.core.pipeline import LmCall, ProgramFailed, ProgramRunner, RunResult
from services.core.program import (
    COMPLETED_MARKER,
    PromptCodec,
    input_text,
)


@dataclass(frozen=True)
class ProbeResult:
    score: float  # the metric's mean
    fields: dict[str, float]  # each label field: fraction answered exactly
    parsed: float  # fraction of answers that parse
    n: int

    def as_dict(self) -> dict[str, Any]:
        return {"score": self.score, "fields": self.fields, "parsed": self.parsed, "n": self.n}


def unformatted_note(point: dict[str, Any]) -> str:
    """Said when answers did not parse: the probes sample numbers and JSON without their
    types' constraints, which serving applies, so the evaluate stage's figures (served
    answers) may be higher."""
    parsed = point.get("parsed", 1.0)
    if parsed >= 1.0:
        return ""
    return (f"; {parsed:.0%} parsed, numbers and JSON sampled without the type constraints "
            "serving applies")  # fmt: skip


# Greedy continuations of chat prompts, in order (the model in training answers): each row's
# answer begun with its start text, continued until the model writes one of the stop texts
# (left out) or its token budget ends; given choices, it writes one of them (greedily, token by
# token among the choices' next tokens, as serving's trie does).
Ask = Callable[[list[list[dict[str, str]]], list[str], tuple[str, ...], tuple[str, ...]], list[str]]


def served_answers(ask: Ask, codec: PromptCodec, prompts: list[list[dict[str, str]]]) -> list[str]:
    """Answers written as serving writes them: each field's header is given and the model
    writes only the value, up to where serving ends it (a typed value at its line's end, free
    text where the model begins a header; a choice is one of its values); then the completed
    marker. A model that has learned the values but not yet the headers is scored on what it
    would serve."""
    from services.runtime.structured import HEADER_LINE, HEADER_START, header, value_type

    answers = [""] * len(prompts)
    for name in codec.output_names:
        answers = [answer + header(name) for answer in answers]
        typed = value_type(codec.signature.output_fields[name])
        stops = (HEADER_START, HEADER_LINE) if typed.kind == "text" else ("\n",)
        values = ask(prompts, answers, stops, typed.choice_texts)
        answers = [a + value.strip() + "\n\n" for a, value in zip(answers, values, strict=True)]
    return [answer + COMPLETED_MARKER for answer in answers]


@dataclass(frozen=True)
class Probe:
    name: str
    answer: Callable[[Ask], ProbeResult]  # the model's answers to the rows -> their score


def make_probe(
    name: str, codec: PromptCodec, metric: Metric, examples: list[Any], fields: list[str]
) -> Probe:
    """A probe over `examples`; `fields` are the label fields counted one by one."""
    inputs = codec.input_names
    prompts = [codec.format_messages({k: input_text(e[k]) for k in inputs}) for e in examples]

    def answer(ask: Ask) -> ProbeResult:
        parsed = [codec.parse(text) for text in served_answers(ask, codec, prompts)]
        return result_of(metric, examples, [a.outputs if a else None for a in parsed], fields)

    return Probe(name, answer)


def make_program_probe(
    name: str, runner: ProgramRunner, metric: Metric, examples: list[Any], fields: list[str]
) -> Probe:
    """A multi-step program's probe: every row's forward runs, the calls answered in batches."""
    rows = [dict(e.inputs()) for e in examples]

    def answer(ask: Ask) -> ProbeResult:
        results = run_lockstep(runner, rows, ask)
        return result_of(metric, examples, [r.outputs for r in results], fields)

    return Probe(name, answer)


def result_of(
    metric: Metric, examples: list[Any], outputs: list[dict[str, Any] | None], fields: list[str]
) -> ProbeResult:
    pairs = list(zip(examples, outputs, strict=True))
    return ProbeResult(
        score=statistics.fmean(score(metric, e, out) for e, out in pairs),
        fields={f: statistics.fmean(field_matches(e, out, f) for e, out in pairs) for f in fields},
        parsed=statistics.fmean(out is not None for out in outputs), n=len(examples),
    )  # fmt: skip


def run_lockstep(runner: ProgramRunner, rows: list[dict[str, Any]], ask: Ask) -> list[RunResult]:
    """Each row's forward on its own thread; whenever every unfinished row waits on an LM
    call, the waiting calls are answered together (one `ask` per predictor), so a program of
    k steps costs about k batched rounds, whatever Python runs between its calls."""
    lock = threading.Condition()
    waiting: list[tuple[str, list[dict[str, str]], list[str]]] = []
    running = [len(rows)]
    stopped: list[BaseException] = []  # the answering failed: every waiting row gives up

    def complete(name: str, messages: list[dict[str, str]]) -> LmCall:
        answer: list[str] = []
        with lock:
            waiting.append((name, messages, answer))
            lock.notify_all()
            lock.wait_for(lambda: bool(answer) or bool(stopped))
        if not answer:
            raise RuntimeError("the probe stopped answering")
        ok = runner.codecs[name].parse(answer[0]) is not None
        return LmCall(name, answer[0], 1.0 if ok else 0.0, "parsed" if ok else "unparsed")

    def run(row: dict[str, Any]) -> RunResult:
        try:
            return runner.run(row, complete)
        except ProgramFailed:
            return RunResult(None, "failed")
        finally:
            with lock:
                running[0] -= 1
                lock.notify_all()

    with ThreadPoolExecutor(max(1, len(rows))) as pool:
        futures = [pool.submit(run, row) for row in rows]
        try:
            _answer_rounds(runner, ask, lock, waiting, running)
        except BaseException as err:  # the rows' threads must end, or the pool never does
            with lock:
                stopped.append(err)
                lock.notify_all()
            raise
        return [f.result() for f in futures]


def _answer_rounds(
    runner: ProgramRunner, ask: Ask, lock: threading.Condition,
    waiting: list[tuple[str, list[dict[str, str]], list[str]]], running: list[int],
) -> None:  # fmt: skip
    """Whenever every unfinished row waits, answer the waiting calls, one batch per predictor."""
    while True:
        with lock:
            lock.wait_for(lambda: running[0] == 0 or len(waiting) == running[0])
            if running[0] == 0:
                return
            batch, waiting[:] = list(waiting), []
        for name in dict.fromkeys(n for n, _, _ in batch):
            calls = [(m, a) for n, m, a in batch if n == name]
            texts = served_answers(ask, runner.codecs[name], [m for m, _ in calls])
            with lock:
                for (_, answer), text in zip(calls, texts, strict=True):
                    answer.append(text)
                lock.notify_all()


def sample(examples: list[Any], size: int, seed: int) -> list[Any]:
    """A fixed sample: the same rows at every probe of one build."""
    if len(examples) <= size:
        return list(examples)
    return random.Random(seed).sample(examples, size)
