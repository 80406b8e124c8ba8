"""The router's confidence: a typed answer's probability among the allowed values (what the
runtime reports with typed decoding) against the geometric-mean probability of the answer's
tokens (the confidence before it, reported with --no-typed-decoding).

For each built spec, the same bundle's default quantization answers the build's calibration
and test parts twice on one --parallel 1 runtime: sampled freely (today's confidence before
typed decoding) and typed (the new one). Each confidence is calibrated on the calibration part
to the build's router target and to stricter ones (the build's own `calibrate`, gold teacher)
and measured on the test part: calls sent to the API and the system's quality. Threshold-free,
over all held-out rows: how well each confidence ranks right answers above wrong ones (AUROC,
with a bootstrap interval), and its mean on right answers by the answer's length in tokens,
which the geometric mean depends on and the label's probability does not.

The two runs differ in their answers as well as in their scores. So, in-process, the typed
answers are also scored four ways by teacher-forcing every allowed value (only the rule
differs): the label's probability among the allowed tokens at each choice (served), its
posterior among the whole allowed values, the geometric mean of its tokens' probabilities
(served before), and its joint probability.

    python -m bench confidence      # the specs below whose bundle is built
"""

from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table

from bench.held_out import build_context
from bench.results import write_results
from services.core.api import pb
from services.core.client import InferenceClient
from services.core.tokens import common_prefix_length
from testkit.processes import REPO, start_runtime

SPECS = (
    REPO / "examples" / "banking_intents" / "spec.yaml",
    REPO / "examples" / "ticket_triage" / "spec.yaml",
)
# Router targets, as fractions of the teacher's quality: the build's (0.95) and stricter ones,
# where the local model alone falls short and calls must go to the API.
ROUTER_TARGETS = (0.95, 0.97, 0.99, 1.0)
BOOTSTRAP_SAMPLES = 2000


class Scored(Protocol):
    """An answer as the router's calibration sees it."""

    split: str
    outcome: str
    confidence: float

    @property
    def score(self) -> float: ...


@dataclass
class Answer:
    split: str
    outcome: str
    correct: bool
    confidence: float
    answer_tokens: int

    @property
    def score(self) -> float:
        return float(self.correct)


def router_calibration(answers: list[Scored], target: float, variant: str) -> dict[str, Any]:
    """The build's calibration (gold teacher) on these answers' confidences: the threshold is
    chosen on the calibration part, the calls it sends to the API counted on the test part."""
    from services.builder.calibrate import calibrate

    student = [{"split": a.split, "score": a.score, "outcome": a.outcome,
                "confidence": a.confidence} for a in answers]  # fmt: skip
    teacher = [{"split": a.split, "score": 1.0} for a in answers]
    result = calibrate(student, teacher, target_retention=target, variant=variant)
    return {key: result[key] for key in ("threshold", "target_retention", "calibration", "test")}


def router_table(router: dict[str, list[dict[str, Any]]], title: str) -> Table:
    test_n = router["before"][0]["test"]["n"]
    table = Table(title=f"{title}: calls sent to the API, test part (n={test_n})")
    for column in ("target (of teacher)", "confidence before: API calls", "system quality",
                   "confidence after: API calls", "system quality"):  # fmt: skip
        table.add_column(column)
    for before, after in zip(router["before"], router["after"], strict=True):
        cells = []
        for found in (before, after):
            test = found["test"]
            lo, hi = test["fallback_interval"]
            cells += [f"{test['fallback_rate']:.1%} [{lo:.1%}-{hi:.1%}]",
                      f"{test['system_quality']:.1%}"]  # fmt: skip
        table.add_row(f"{before['target_retention']:.0%}", *cells)
    return table


def auroc(answers: list[Answer]) -> float | None:
    """The chance that a right answer's confidence is above a wrong one's (ties count half)."""
    right = [a.confidence for a in answers if a.correct]
    wrong = [a.confidence for a in answers if not a.correct]
    if not right or not wrong:
        return None
    wins = sum((r > w) + 0.5 * (r == w) for r in right for w in wrong)
    return wins / (len(right) * len(wrong))


def auroc_interval(answers: list[Answer], seed: int = 0) -> tuple[float, float] | None:
    """95% percentile bootstrap interval of the AUROC (rows resampled with replacement)."""
    rng = random.Random(seed)
    found = [auroc(rng.choices(answers, k=len(answers))) for _ in range(BOOTSTRAP_SAMPLES)]
    values = sorted(v for v in found if v is not None)
    if not values:
        return None
    return values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]


def by_length(answers: list[Answer]) -> dict[int, dict[str, float]]:
    """Mean confidence of the right answers, by the answer's token count."""
    groups: dict[int, list[float]] = defaultdict(list)
    for a in answers:
        if a.correct:
            groups[a.answer_tokens].append(a.confidence)
    return {n: {"n": len(v), "mean": statistics.mean(v)} for n, v in sorted(groups.items())}


def held_out_rows(spec_path: Path) -> tuple[Any, list[tuple[str, Any]]]:
    """The spec and its (split, example) rows: the build's calibration and test parts."""
    context = build_context(spec_path)
    (_,) = context.program.predictors()  # one Predict: its confidence is the call's
    rows = [("calibration", e) for e in context.calibset] + [("test", e) for e in context.testset]
    return context.spec, rows


def answer_all(
    bundle: Path, variant: str, rows: list[tuple[str, Any]], *flags: str
) -> list[Answer]:
    """Every row once, one call at a time, on a --parallel 1 runtime."""
    from services.builder.metrics import exact_match

    server = start_runtime("--bundle", str(bundle), "--variant", variant, "--parallel", "1",
                           *flags)  # fmt: skip
    tokens = answer_tokenizer(bundle, variant)
    answers = []
    try:
        with InferenceClient(server.target, timeout_s=120) as client:
            for split, example in rows:
                reply = client.predict(dict(example.inputs()))
                outputs = dict(reply.outputs)
                outcome = pb.PredictOutcome.Name(reply.outcome)
                answers.append(Answer(
                    split=split, outcome=outcome.removeprefix("PREDICT_OUTCOME_").lower(),
                    correct=bool(outputs) and exact_match(example, outputs),
                    confidence=reply.confidence,
                    answer_tokens=sum(tokens(v) for v in outputs.values()),
                ))  # fmt: skip
    finally:
        server.terminate()
    return answers


def answer_tokenizer(bundle: Path, variant: str) -> Any:
    """Counts a value's tokens as the model writes it (after a newline, as in the answer)."""
    import llama_cpp

    from services.core.bundle import Bundle

    vocab = llama_cpp.Llama(str(Bundle.open(bundle).model_path(variant)), vocab_only=True,
                            verbose=False)  # fmt: skip
    newline = len(vocab.tokenize(b"\n", add_bos=False))
    return lambda text: len(vocab.tokenize(("\n" + text).encode(), add_bos=False)) - newline


def compare(spec_path: Path, console: Console) -> dict[str, Any] | None:
    spec, rows = held_out_rows(spec_path)
    bundle = Path(spec.output) / "bundle"
    bundle = bundle if bundle.is_absolute() else REPO / bundle
    if not (bundle / "manifest.json").is_file():
        console.print(f"[yellow]confidence bench: no bundle at {bundle}; run `edgedistill "
                      f"build {spec_path.relative_to(REPO)}`[/]")  # fmt: skip
        return None
    variant = spec.quantizations[0]
    console.print(f"{spec.name}: answering {len(rows)} held-out rows, sampled and typed ...")
    answers = {
        "before": answer_all(bundle, variant, rows, "--no-typed-decoding"),
        "after": answer_all(bundle, variant, rows),
    }
    targets = sorted({spec.router.target_retention, *ROUTER_TARGETS})
    router = {name: [router_calibration(list(found), t, variant) for t in targets]
              for name, found in answers.items()}  # fmt: skip
    ranking = {name: {"n": len(found), "right": sum(a.correct for a in found),
                      "auroc": auroc(found), "interval": auroc_interval(found),
                      "right_by_answer_tokens": by_length(found)}
               for name, found in answers.items()}  # fmt: skip
    console.print(router_table(router, f"{spec.name} {variant}"))
    console.print(ranking_table(ranking))
    records = scored_by_rules(bundle, variant, rows)
    rules = compare_rules(records, targets, variant)
    console.print(rules_table(rules, len(records), sum(r["correct"] for r in records)))
    return {
        "spec": str(spec_path.relative_to(REPO)), "bundle": str(bundle.relative_to(REPO)),
        "variant": variant, "router": router, "ranking": ranking, "rules": rules,
        "answers": {name: [asdict(a) for a in found] for name, found in answers.items()},
        "scored_typed_answers": records,
    }  # fmt: skip


def ranking_table(ranking: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="How each confidence ranks right answers above wrong ones (all rows)")
    for column in ("confidence", "right / n", "AUROC [95% bootstrap]",
                   "mean on right answers, by answer tokens"):  # fmt: skip
        table.add_column(column)
    for name, found in ranking.items():
        score = auroc_text(found)
        lengths = ", ".join(f"{n}: {v['mean']:.3f} (n={v['n']})"
                            for n, v in found["right_by_answer_tokens"].items())  # fmt: skip
        table.add_row(name, f"{found['right']} / {found['n']}", score, lengths)
    return table


# The scoring rules compared on the same typed answers, by their records' keys.
RULES = {
    "label among allowed tokens (served)": "renormalised",
    "label posterior among whole values": "posterior",
    "geometric mean of its tokens (before)": "geometric_mean",
    "joint probability of its tokens": "joint",
}


def scored_by_rules(
    bundle: Path, variant: str, rows: list[tuple[str, Any]]
) -> list[dict[str, Any]]:
    """The typed answer to each row (greedy over the allowed values) and its score under
    each rule, from every allowed value's token log-probabilities (teacher-forced)."""
    import llama_cpp

    from services.builder.data import normalize
    from services.core.bundle import Bundle
    from services.core.program import PromptCodec, program_from_file
    from services.runtime.backends.llamacpp_batched import BatchedLlamaCpp
    from services.runtime.predict import prepare_answer

    opened = Bundle.open(bundle)
    codec = PromptCodec(program_from_file(opened.program_path))
    model = opened.model_path(variant)
    # the runtime's engine builds each prompt and typed plan; a second copy scores them
    engine = BatchedLlamaCpp(model, n_ctx=2048, n_threads=2, parallel=1)
    scorer = llama_cpp.Llama(str(model), n_ctx=2048, logits_all=True, n_threads=2, verbose=False)
    name = codec.output_names[0]
    try:
        records = []
        for split, example in rows:
            messages = codec.format_messages(dict(example.inputs()))
            prompt = prepare_answer(engine, codec, messages, typed=True)
            assert prompt.plan is not None and prompt.tokens is not None
            plan = prompt.plan.fields[0]
            if plan.kind != "choice":
                raise ValueError(f"{name}: the first output is not a Literal or bool")
            value_logprobs = teacher_forced(scorer, list(prompt.tokens), plan.choices)
            chosen, renormalised = typed_choice(plan.choices, value_logprobs)
            text = plan.choice_texts[chosen]
            records.append({
                "split": split, "answer": text, "answer_tokens": len(plan.choices[chosen]),
                "correct": normalize(text) == normalize(example[name]),
                **rule_scores(value_logprobs, chosen, renormalised),
            })  # fmt: skip
        return records
    finally:
        engine.close()
        scorer.close()


def teacher_forced(
    scorer: Any, prompt: list[int], values: tuple[tuple[int, ...], ...]
) -> list[list[float]]:
    """Each value's tokens' log-probabilities after the prompt (its prefix evaluated once)."""
    import numpy as np

    # llama-cpp-python drops the KV cache past n_tokens on eval: keep the shared prefix
    shared = common_prefix_length([scorer.input_ids[: scorer.n_tokens].tolist(), prompt])
    scorer.n_tokens = min(shared, len(prompt) - 1)
    scorer.eval(prompt[scorer.n_tokens :])
    found = []
    for tokens in values:
        scorer.n_tokens = len(prompt)
        scorer.eval(list(tokens))
        logits = np.asarray(scorer.scores[len(prompt) - 1 : len(prompt) - 1 + len(tokens)])
        peak = logits.max(axis=1, keepdims=True)
        norm = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1))
        found.append([float(logits[i, t] - norm[i]) for i, t in enumerate(tokens)])
    return found


def typed_choice(
    values: tuple[tuple[int, ...], ...], logprobs: list[list[float]]
) -> tuple[int, float]:
    """What typed decoding picks greedily (the best allowed token at each step that chooses)
    and the log of its served confidence (the chosen tokens renormalised over the allowed)."""
    alive, step, renormalised = list(range(len(values))), 0, 0.0
    while len(alive) > 1:
        nexts: dict[int, list[int]] = defaultdict(list)
        for index in alive:
            nexts[values[index][step]].append(index)
        if len(nexts) > 1:
            options = {t: logprobs[ks[0]][step] for t, ks in nexts.items()}
            best = max(options, key=lambda t: options[t])
            renormalised += options[best] - math.log(sum(math.exp(v) for v in options.values()))
        else:
            best = next(iter(nexts))
        alive, step = nexts[best], step + 1
    return alive[0], renormalised


def rule_scores(logprobs: list[list[float]], chosen: int, renormalised: float) -> dict[str, float]:
    joints = [sum(found) for found in logprobs]
    peak = max(joints)
    total = peak + math.log(sum(math.exp(j - peak) for j in joints))
    return {
        "renormalised": math.exp(renormalised),
        "posterior": math.exp(joints[chosen] - total),
        "geometric_mean": math.exp(joints[chosen] / len(logprobs[chosen])),
        "joint": math.exp(joints[chosen]),
    }


def compare_rules(
    records: list[dict[str, Any]], targets: list[float], variant: str
) -> dict[str, Any]:
    """Per rule, on the same answers: the ranking (AUROC) and the router's calls at each target."""
    found = {}
    for label, key in RULES.items():
        answers = [Answer(r["split"], "parsed", r["correct"], r[key], r["answer_tokens"])
                   for r in records]  # fmt: skip
        found[label] = {
            "auroc": auroc(answers), "interval": auroc_interval(answers),
            "router": [router_calibration(list(answers), t, variant) for t in targets],
        }  # fmt: skip
    return found


def rules_table(rules: dict[str, Any], n: int, right: int) -> Table:
    title = f"The same typed answers ({right} of {n} right), scored by each rule"
    table = Table(title=title)
    targets = [r["target_retention"] for r in next(iter(rules.values()))["router"]]
    test_n = next(iter(rules.values()))["router"][0]["test"]["n"]
    for column in ("rule", "AUROC [95% bootstrap]",
                   *(f"API calls at {t:.0%} (test, n={test_n})" for t in targets)):  # fmt: skip
        table.add_column(column)
    for label, found in rules.items():
        calls = [f"{r['test']['fallback_rate']:.1%} -> {r['test']['system_quality']:.1%}"
                 for r in found["router"]]  # fmt: skip
        table.add_row(label, auroc_text(found), *calls)
    return table


def auroc_text(found: dict[str, Any]) -> str:
    """An AUROC with its interval; n/a where every answer is right (or every one wrong)."""
    if found["auroc"] is None:
        return "n/a"
    interval = found["interval"]
    text = f"{found['auroc']:.3f}"
    return text + f" [{interval[0]:.3f}-{interval[1]:.3f}]" if interval else text


def main() -> None:
    console = Console()
    results = {}
    for spec_path in SPECS:
        found = compare(spec_path, console)
        if found:
            results[found["spec"]] = found
    if results:
        write_results("router_confidence", {"specs": list(results), "targets": ROUTER_TARGETS},
                      {"programs": results})  # fmt: skip
