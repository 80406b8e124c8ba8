"""Stage 6, evaluate: teacher, untuned baselines and each distilled GGUF on held-out rows.

Students are served exactly as the runtime serves them (services.runtime.predict, the
runtime's max_tokens default), each in a fresh process so that its peak memory is its own.
Every example carries its split: the calibration part chooses the router's threshold, the test
part is what the report shows.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from services.builder.metrics import Metric, canonical, field_f1, field_matches, score
from services.builder.spec import TeacherSpec
from services.core.pipeline import ProgramFailed, call_program
from services.core.program import input_text
from services.core.stats import percentile, score_interval


def evaluate_gguf(
    *,
    label: str,
    gguf_path: Path,
    program_path: Path,
    examples: list[Any],
    splits: list[str],
    input_names: list[str],
    metric: Metric,
    max_tokens: int,
    n_threads: int,
    num_threads: int = 4,
    summarised: str = "test",
) -> dict[str, Any]:
    """Serves every example in a child process (spawn, so its peak memory is its own), then
    scores the answers here (an LM-judged metric needs this process's judge). The summary's
    figures are the `summarised` split's."""
    rows = [{k: input_text(e[k]) for k in input_names if k in e} for e in examples]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        result: dict[str, Any] = pool.apply(
            _serve_in_child, (str(gguf_path), str(program_path), rows, max_tokens, n_threads)
        )
    answers = result.pop("answers")
    scores = score_all(metric, examples, [a["outputs"] for a in answers], num_threads)
    result["examples"] = [
        {"split": split, "score": value, **answer}
        for split, value, answer in zip(splits, scores, answers, strict=True)
    ]
    return {"label": label, **result, **summary(result["examples"], summarised)}


def score_all(
    metric: Metric, examples: list[Any], outputs: list[dict[str, Any] | None], num_threads: int
) -> list[float]:
    with ThreadPoolExecutor(num_threads) as pool:
        return list(
            pool.map(lambda pair: score(metric, *pair), zip(examples, outputs, strict=True))
        )


def summary(examples: list[dict[str, Any]], split: str = "test") -> dict[str, Any]:
    """Score, interval and serving figures over one split's examples (the report's numbers)."""
    part = [e for e in examples if e["split"] == split]
    scores = [e["score"] for e in part]
    out: dict[str, Any] = {"n": len(part), "score": sum(scores) / len(scores),
                           "interval": score_interval(scores)}  # fmt: skip
    if part and "latency_ms" in part[0]:
        latencies = [e["latency_ms"] for e in part]
        out |= {
            "latency_p50_ms": percentile(latencies, 0.5),
            "latency_p95_ms": percentile(latencies, 0.95),
            "latency_mean_ms": round(statistics.fmean(latencies), 1),
        }
    if part and "outcome" in part[0]:
        out["parsed_fraction"] = sum(e["outcome"] == "parsed" for e in part) / len(part)
    if part and "prompt_tokens" in part[0]:
        out["prompt_tokens_per_call"] = statistics.fmean(e["prompt_tokens"] for e in part)
        out["completion_tokens_per_call"] = statistics.fmean(e["completion_tokens"] for e in part)
    return out


def field_scores(
    gold: list[Any], answered: list[dict[str, Any]], fields: list[str],
    free_text: Sequence[str] = (), split: str = "test",
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Each output field's score on one split, with its interval: label fields and typed
    values by exact match (a model can pass the metric's mean while one field sits at its
    majority rate; a number or a JSON value near the label is still wrong), free-text fields
    by token F1."""
    pairs = [(g, a) for g, a in zip(gold, answered, strict=True) if a["split"] == split]
    out = {}
    for name in [*fields, *free_text]:
        measure = "exact match" if name in fields else "token F1"
        values = [field_value(g, a.get("outputs"), name, measure) for g, a in pairs]
        out[name] = {"score": sum(values) / len(values), "interval": score_interval(values),
                     "measure": measure}  # fmt: skip
    return out


def field_value(gold: Any, outputs: dict[str, Any] | None, name: str, measure: str) -> float:
    if measure == "exact match":
        return float(field_matches(gold, outputs, name))
    if not outputs:
        return 0.0
    # as data: an answered `None` is the label None, `51` the label 51
    return field_f1(canonical(gold[name]), canonical(outputs.get(name, "")))


def _serve_in_child(
    gguf_path: str, program_path: str, rows: list[dict[str, str]], max_tokens: int,
    n_threads: int,
) -> dict[str, Any]:  # fmt: skip
    from services.runtime.backends.llamacpp import LlamaCppBackend, keep_prefixes
    from services.runtime.loading import load_program

    program = load_program(Path(program_path))
    backend = LlamaCppBackend(Path(gguf_path), n_ctx=4096, n_threads=n_threads)
    if program.runner is not None:
        answer = _program_answers(backend, program.runner, max_tokens)
    else:
        assert program.codec is not None
        answer = predict_answers(backend, program.codec, max_tokens)
    keep_prefixes(backend, program.codecs)  # as the runtime serves it (--prefix-cache)
    answers: list[dict[str, Any]] = []
    tokens_per_s: list[float] = []
    for inputs in rows:
        row, speeds = answer(inputs)
        answers.append(row)
        tokens_per_s += speeds
    backend.close()
    return {
        "gguf": gguf_path,
        "quantization": backend.info.quantization,
        "size_bytes": Path(gguf_path).stat().st_size,
        "generation_tokens_per_s": round(statistics.median(tokens_per_s), 1)
        if tokens_per_s
        else None,
        "peak_rss_mb": round(_peak_rss_kib() / 1024, 1),
        "answers": answers,
    }


Answer = Callable[[dict[str, str]], tuple[dict[str, Any], list[float]]]


def predict_answers(backend: Any, codec: Any, max_tokens: int) -> Answer:
    """One Predict per row, as the runtime answers a single-predictor program."""
    from services.runtime.predict import predict_once, predict_params

    params = predict_params(max_tokens, seed=0)

    def answer(inputs: dict[str, str]) -> tuple[dict[str, Any], list[float]]:
        result = predict_once(backend, codec, inputs, params)
        row = {
            "confidence": result.confidence, "outcome": result.outcome,
            "outputs": result.outputs, "latency_ms": round(result.latency_s * 1000, 1),
            "prompt_tokens": result.finished.prompt_tokens,
            "completion_tokens": result.finished.completion_tokens,
            "cached_prompt_tokens": result.finished.cached_prompt_tokens,
        }  # fmt: skip
        return row, _decode_speed(result)

    return answer


def _program_answers(backend: Any, runner: Any, max_tokens: int) -> Answer:
    """A multi-step program's forward per row, its predictor calls on this model (each with
    the runtime's max_tokens default, as the runtime gives every call)."""
    from services.runtime.predict import complete_once, lm_call, predict_params

    params = predict_params(max_tokens, seed=0)

    def answer(inputs: dict[str, str]) -> tuple[dict[str, Any], list[float]]:
        speeds: list[float] = []

        def complete(name: str, messages: list[dict[str, str]]) -> Any:
            result = complete_once(backend, runner.codecs[name], messages, params)
            speeds.extend(_decode_speed(result))
            return lm_call(name, result.raw_text, result, result.finished)

        started = time.perf_counter()
        try:
            run = runner.run(inputs, complete)
            outputs, outcome, calls, confidence = (
                run.outputs,
                run.outcome,
                run.calls,
                run.confidence,
            )
        except ProgramFailed as failed:  # the program's own error on this row: scored 0
            outputs, outcome, calls, confidence = None, "failed", failed.calls, 0.0
        row = {
            "confidence": confidence,
            "outcome": outcome, "outputs": outputs,
            "latency_ms": round((time.perf_counter() - started) * 1000, 1),
            "prompt_tokens": sum(c.prompt_tokens for c in calls),
            "completion_tokens": sum(c.completion_tokens for c in calls),
            "cached_prompt_tokens": sum(c.cached_prompt_tokens for c in calls),
            "lm_calls": len(calls),
        }  # fmt: skip
        return row, speeds

    return answer


def _decode_speed(result: Any) -> list[float]:
    """Sampled tokens per second after the first (typed decoding appends the scaffold without
    sampling: a one-label answer has no decode speed to measure)."""
    finished = result.finished
    steps = finished.completion_tokens if finished.decode_steps is None else finished.decode_steps
    decode_s = result.latency_s - (result.first_token_s or 0.0)
    if steps > 1 and decode_s > 0:
        return [(steps - 1) / decode_s]
    return []


def _peak_rss_kib() -> int:
    """This process's peak resident memory. VmHWM, not ru_maxrss: on Linux ru_maxrss survives
    exec, so a spawned child would report its (large) parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def evaluate_teacher(
    *,
    program: Any,
    teacher: TeacherSpec,
    examples: list[Any],
    splits: list[str],
    metric: Metric,
    output_names: list[str],
    summarised: str = "test",
    arguments: Callable[[dict[str, Any]], dict[str, Any]] = dict,
) -> dict[str, Any]:
    """The teacher on the held-out rows, timed per call, with the tokens it spent. With `gold`
    the labels are the answers: a perfect score, and nothing to time. `arguments` types a
    row's inputs as the served program's `forward` gets them."""
    if teacher.is_gold:
        per_example = [
            {"split": split, "score": 1.0, "outputs": {k: e.get(k) for k in output_names}}
            for split, e in zip(splits, examples, strict=True)
        ]
        return {"label": "teacher (gold labels)", "gold": True, "examples": per_example,
                **summary(per_example, summarised)}  # fmt: skip
    import dspy

    from services.builder.judge import lm_usage
    from services.builder.teacher import teacher_lm

    lm = teacher_lm(teacher)
    teacher_program = program.deepcopy()
    teacher_program.set_lm(lm)

    def run(example: Any) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            with dspy.context(lm=lm):  # the context's LM too, as where the traces were made
                prediction = call_program(teacher_program, arguments(dict(example.inputs())))
        except Exception as err:
            return {"outputs": None, "error": f"{type(err).__name__}: {err}"[:300],
                    "latency_ms": round((time.perf_counter() - started) * 1000, 1)}  # fmt: skip
        latency_ms = round((time.perf_counter() - started) * 1000, 1)
        return {"outputs": {k: prediction.get(k) for k in output_names}, "latency_ms": latency_ms}

    with dspy.context(), ThreadPoolExecutor(teacher.num_threads) as pool:
        answers = list(pool.map(run, examples))
    scores = score_all(metric, examples, [a["outputs"] for a in answers], teacher.num_threads)
    per_example = [
        {"split": split, "score": value, **answer}
        for split, value, answer in zip(splits, scores, answers, strict=True)
    ]
    usage = lm_usage(lm)
    calls = len(examples)
    return {
        "label": f"teacher ({teacher.model})",
        "gold": False,
        "usage": usage,
        "prompt_tokens_per_call": usage["prompt_tokens"] / calls,
        "completion_tokens_per_call": usage["completion_tokens"] / calls,
        "failures": sum("error" in e for e in per_example),
        "examples": per_example,
        **summary(per_example, summarised),
    }


def write_eval(path: Path, evaluation: dict[str, Any]) -> None:
    """eval.json; typed answers (a model, an Enum) as their JSON data, not Python's repr."""
    from pydantic_core import to_jsonable_python

    path.write_text(json.dumps(to_jsonable_python(evaluation, fallback=str), indent=2))
