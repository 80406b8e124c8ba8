"""Stage 6, evaluate: teacher, untuned student and each distilled GGUF on the held-out dev set.

Students are served exactly as the runtime serves them (services.runtime.predict), each in a
fresh process so that its peak memory is its own.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from services.builder.data import Metric, resolve_metric, score
from services.builder.spec import TeacherSpec
from services.core.stats import percentile, score_interval


def evaluate_gguf(
    *,
    label: str,
    gguf_path: Path,
    program_path: Path,
    dev_rows: list[dict[str, Any]],
    input_names: list[str],
    metric_name: str,
    max_tokens: int,
    n_threads: int,
) -> dict[str, Any]:
    """Runs in a child process (spawn): loads the GGUF, predicts every dev example."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        result: dict[str, Any] = pool.apply(
            _evaluate_in_child,
            (label, str(gguf_path), str(program_path), dev_rows, input_names, metric_name,
             max_tokens, n_threads),
        )  # fmt: skip
    return result


def _evaluate_in_child(
    label: str,
    gguf_path: str,
    program_path: str,
    dev_rows: list[dict[str, Any]],
    input_names: list[str],
    metric_name: str,
    max_tokens: int,
    n_threads: int,
) -> dict[str, Any]:
    import dspy

    from services.core.program import ProgramSpec, PromptCodec
    from services.runtime.backends.llamacpp import LlamaCppBackend
    from services.runtime.predict import predict_once, predict_params

    metric = resolve_metric(metric_name)
    codec = PromptCodec(ProgramSpec.load(Path(program_path)))
    backend = LlamaCppBackend(Path(gguf_path), n_ctx=4096, n_threads=n_threads)
    params = predict_params(max_tokens, seed=0)
    per_example: list[dict[str, Any]] = []
    latencies, tokens_per_s = [], []
    for row in dev_rows:
        example = dspy.Example(**row).with_inputs(*input_names)
        result = predict_once(backend, codec, {k: str(row[k]) for k in input_names}, params)
        value = score(metric, example, result.outputs)
        latencies.append(result.latency_s)
        decode_s = result.latency_s - (result.first_token_s or 0.0)
        if result.finished.completion_tokens > 1 and decode_s > 0:
            tokens_per_s.append((result.finished.completion_tokens - 1) / decode_s)
        per_example.append(
            {
                "score": value,
                "confidence": result.confidence,
                "outcome": result.outcome,
                "outputs": result.outputs,
                "latency_ms": round(result.latency_s * 1000, 1),
            }
        )
    backend.close()
    peak_kib = _peak_rss_kib()
    scores = [e["score"] for e in per_example]
    return {
        "label": label,
        "gguf": gguf_path,
        "quantization": backend.info.quantization,
        "size_bytes": Path(gguf_path).stat().st_size,
        "score": sum(scores) / len(scores),
        "interval": score_interval(scores),
        "parsed_fraction": sum(e["outcome"] == "parsed" for e in per_example) / len(per_example),
        "latency_p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "latency_p95_ms": round(percentile(latencies, 0.95) * 1000, 1),
        "generation_tokens_per_s": round(statistics.median(tokens_per_s), 1)
        if tokens_per_s
        else None,
        "peak_rss_mb": round(peak_kib / 1024, 1),
        "examples": per_example,
    }


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
    devset: list[Any],
    metric: Metric,
    output_names: list[str],
) -> dict[str, Any]:
    """The teacher's dev score. With `gold` the labels are the answers: a perfect score."""
    if teacher.is_gold:
        per_example = [{"score": 1.0} for _ in devset]
    else:
        import dspy

        from services.builder.teacher import teacher_lm

        teacher_program = program.deepcopy()
        teacher_program.set_lm(teacher_lm(teacher))

        def run(example: Any) -> dict[str, Any]:
            try:
                prediction = teacher_program(**example.inputs())
            except Exception as err:
                return {"score": 0.0, "error": f"{type(err).__name__}: {err}"[:300]}
            outputs = {k: prediction.get(k) for k in output_names}
            return {"score": score(metric, example, outputs), "outputs": outputs}

        with dspy.context(), ThreadPoolExecutor(teacher.num_threads) as pool:
            per_example = list(pool.map(run, devset))
    scores = [e["score"] for e in per_example]
    return {
        "label": f"teacher ({teacher.model})",
        "score": sum(scores) / len(scores),
        "interval": score_interval(scores),
        "examples": per_example,
    }


def write_eval(path: Path, evaluation: dict[str, Any]) -> None:
    path.write_text(json.dumps(evaluation, indent=2, default=str))
