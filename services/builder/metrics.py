"""Metrics: answers compared with their labels as data, the built-in metrics, and the spec's
own metric handed typed predictions."""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from services.builder.data import labelled, normalize
from services.builder.spec import SpecError, import_object
from services.core.program import pydantic_models, typed_value

Metric = Callable[..., Any]


def canonical(value: Any) -> Any:
    """A value as answers are compared: JSON data, strings without case or extra spacing, and a
    string that holds JSON (a number, true/false, a list or object, as the wire writes typed
    values) as that JSON. So `3`, `"3"` and `3.0` are equal, as are a pydantic model, its dict
    and its JSON text, and None, `null` and `None` (ChatAdapter's text of None)."""
    from pydantic_core import to_jsonable_python

    value = to_jsonable_python(value, fallback=str)
    if isinstance(value, str):
        text = normalize(value)
        if text == "none":
            return None
        parsed = _literal(text)
        return text if parsed is None or isinstance(parsed, str) else canonical(parsed)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, dict):
        return {normalize(k): canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [canonical(item) for item in value]
    return value


def _literal(text: str) -> Any:
    """JSON text, or a Python literal (a multi-step program's outputs are Python's str() of
    its values); None when it is neither."""
    import ast

    try:
        return json.loads(text)
    except ValueError:
        pass
    if text[:1] in "[{(":
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
    return None


def field_matches(example: Any, outputs: Any, name: str) -> bool:
    """One output field answered as labelled, ignoring case and spacing, typed values compared
    as data (no answer: False)."""
    return outputs is not None and canonical(example[name]) == canonical(outputs.get(name, ""))


def answered_labels(example: Any, prediction: Any) -> list[str]:
    """The row's labelled fields the prediction answers, in its order: the program's outputs.
    A row's other columns (an id, a note) and a multi-step program's intermediate labels
    (what a gold teacher answers a middle step with) are not the program's to answer."""
    labels = set(labelled(list(example.labels())))
    return [name for name in prediction.keys() if name in labels]  # noqa: SIM118 - without dspy_ keys


def exact_match(example: Any, prediction: Any, trace: Any = None) -> bool:
    """Every output field equals its label, ignoring case and spacing (typed values compared
    as data)."""
    fields = answered_labels(example, prediction)
    return bool(fields) and all(field_matches(example, prediction, k) for k in fields)


def token_f1(example: Any, prediction: Any, trace: Any = None) -> float:
    """SQuAD-style token F1 on the last output field."""
    fields = answered_labels(example, prediction)
    return field_f1(example[fields[-1]], prediction.get(fields[-1], "")) if fields else 0.0


def field_f1(gold_text: Any, guess_text: Any) -> float:
    """SQuAD-style token F1 between two texts; a typed value (a model, a list) as its JSON, so
    a model and its dict are the same words. Two texts without words (`[]`, ``) score 1 when
    they are the same text."""
    gold_text, guess_text = normalize(as_text(gold_text)), normalize(as_text(guess_text))
    gold, guess = re.findall(r"\w+", gold_text), re.findall(r"\w+", guess_text)
    if not gold and not guess:
        return float(gold_text == guess_text)
    common = sum((Counter(gold) & Counter(guess)).values())
    if not gold or not guess or common == 0:
        return 0.0
    precision, recall = common / len(guess), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def as_text(value: Any) -> str:
    from pydantic_core import to_jsonable_python

    if isinstance(value, str):
        return value
    return json.dumps(to_jsonable_python(value, fallback=str), ensure_ascii=False)


BUILTIN_METRICS: dict[str, Metric] = {"exact_match": exact_match, "token_f1": token_f1}


class TypedMetric:
    """The spec's metric, handed predictions typed as the program's own signature declares
    (an `int` field an int, a pydantic model the model), whoever answered: a student's answer
    reaches the build as text, a teacher's through DSPy already typed. A value that does not
    parse as its type is passed as it came. A metric of two parameters `(example, prediction)`
    is never handed the trace DSPy's optimizers pass.

    An answer the metric raises on (a malformed value, a missing field) scores 0, as in DSPy's
    Evaluate, and the error is kept in `errors` for the stage's summary and the report."""

    def __init__(self, metric: Metric, annotations: dict[str, Any], context_lm: Any = None) -> None:
        self.metric = metric
        self.annotations = annotations
        self.takes_trace = _takes_trace(metric)
        self.errors: list[str] = []
        # The LM a judge inside the metric calls, as `dspy.configure(lm=...)` gave it where the
        # metric was written (metric_lm, or an API teacher).
        self.context_lm = context_lm

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> Any:
        import dspy

        typed = typed_prediction(prediction, self.annotations)
        lm = dspy.context(lm=self.context_lm) if self.context_lm else contextlib.nullcontext()
        try:
            with lm:
                if trace is None or not self.takes_trace:
                    return self.metric(example, typed)
                return self.metric(example, typed, trace)
        except Exception as err:  # one unreadable answer never sinks the build
            self.errors.append(f"{type(err).__name__}: {err}"[:300])
            return 0.0

    def errors_since(self, start: int) -> dict[str, Any] | None:
        """What the metric raised on since `len(errors)` was `start`: a count and the first."""
        raised = self.errors[start:]
        return {"count": len(raised), "first": raised[0]} if raised else None

    def __getattr__(self, name: str) -> Any:  # the judge's `lm` and `failures`
        if name in ("metric", "annotations", "takes_trace", "errors", "context_lm"):  # a copy
            raise AttributeError(name)
        return getattr(self.metric, name)


def check_metric(
    metric: TypedMetric, name: str, rows: list[Any], output_names: list[str], threshold: float
) -> str | None:
    """A user's metric scored on the first train rows' own labels, before any stage runs: one
    that raises there is broken (SpecError now, not after the teacher and the fine-tune); one
    that scores every label under the threshold would reject every teacher answer (a warning
    returned). Built-in metrics are not checked; nor are outputs no row labels (reasoning)."""
    import dspy

    if name in BUILTIN_METRICS or name == "semantic_f1":
        return None
    scores = []
    for number_of_row, row in enumerate(rows[:8], 1):
        if not all(field in row for field in output_names):
            continue
        raised = len(metric.errors)
        value = metric(row, dspy.Prediction(**{field: row[field] for field in output_names}))
        if len(metric.errors) > raised:
            error = metric.errors.pop()
            raise SpecError(
                f"metric: {name} raised {error} scoring data.train row {number_of_row} "
                "against its own labels; fix the metric (it is handed a dspy.Example and a "
                "dspy.Prediction whose fields have the signature's types)"
                + model_labels_hint(error, metric.annotations)
                + (NO_JUDGE_HINT if "No LM is loaded" in error else "")
                + (shadowed_fields_hint(output_names) if "'method'" in error else "")
            )
        number = metric_number(value)
        if number is None:
            raise SpecError(
                f"metric: {name} returned {value!r:.80} scoring data.train row "
                f"{number_of_row} against its own labels{NOT_A_SCORE}"
            )
        scores.append(number)
    if scores and max(scores) < threshold:
        return (
            f"metric: {name} scores the first train rows' own labels at most {max(scores):g}, "
            f"under metric_threshold {threshold:g}: an API teacher's answers would all be "
            "rejected; check the metric or lower metric_threshold"
            + shadowed_fields_hint(output_names)
        )
    return None


NO_JUDGE_HINT = (
    ". The metric calls an LM (a judge): set metric_lm: {model, api_base, api_key_env} in the "
    "spec, or use an API teacher (teacher.model), which then judges too"
)


def shadowed_fields_hint(names: list[str]) -> str:
    """Fields named like a method of dspy.Example (`items`, `keys`, `copy`): `example.items`
    is the method, not the field, a mistake a metric makes without raising."""
    import dspy

    shadowed = [n for n in names if hasattr(dspy.Example, n) or hasattr(dspy.Prediction, n)]
    if not shadowed:
        return ""
    first = shadowed[0]
    return (
        f". Note: {', '.join(map(repr, shadowed))} also "
        f"{'names a method' if len(shadowed) == 1 else 'name methods'} of dspy.Example and "
        f"dspy.Prediction, so `example.{first}` is the method: read the field as "
        f"example[{first!r}] (prediction[{first!r}])"
    )


def model_labels_hint(error: str, annotations: dict[str, Any]) -> str:
    """A metric reading a label typed as a pydantic model like a dict (`item["product"]`, as
    DSPy hands it a row's JSON): the build hands it the model, as the signature types it."""
    if "not subscriptable" not in error:
        return ""
    for name, annotation in annotations.items():
        for model in pydantic_models(annotation):
            if f"'{model.__name__}' object" in error:
                field = next(iter(model.model_fields), "name")
                return (
                    f". The labels of {name!r} are {model.__name__} objects, as the signature "
                    f"types them: read a field as an attribute (`value.{field}`), or "
                    "`value.model_dump()` for its dict"
                )
    return ""


def _takes_trace(metric: Metric) -> bool:
    import inspect

    try:
        parameters = inspect.signature(metric).parameters.values()
    except (TypeError, ValueError):
        return True
    kinds = [p.kind for p in parameters]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return inspect.Parameter.VAR_POSITIONAL in kinds or sum(k in positional for k in kinds) >= 3


def typed_prediction(prediction: Any, annotations: dict[str, Any]) -> Any:
    import dspy

    values = dict(prediction.items())
    for name, annotation in annotations.items():
        if name in values and annotation is not str:
            with contextlib.suppress(Exception):  # unparsed: the metric sees it as it came
                values[name] = typed_value(values[name], annotation)
    return dspy.Prediction(**values)


def resolve_metric(name: str, judge: Any = None) -> Metric:
    """A built-in metric, `semantic_f1` judged by `judge` (a TeacherSpec), or an import path."""
    if name in BUILTIN_METRICS:
        return BUILTIN_METRICS[name]
    if name == "semantic_f1":
        from services.builder.judge import SemanticF1Judge
        from services.builder.teacher import teacher_lm

        return SemanticF1Judge(teacher_lm(judge))
    metric = import_object(name, "metric")
    if not callable(metric):
        raise SpecError(f"metric: {name} is not callable")
    return metric


def score(metric: Metric, example: Any, outputs: dict[str, Any] | None) -> float:
    """The metric as a number in 0..1; no outputs (unparsed) scores 0."""
    import dspy

    if outputs is None:
        return 0.0
    value = metric(example, dspy.Prediction(**outputs))
    number = metric_number(value)
    if number is None:
        name = getattr(getattr(metric, "metric", metric), "__name__", "the metric")
        raise SpecError(f"metric: {name} returned {value!r:.80} for an answer{NOT_A_SCORE}")
    return number


NOT_A_SCORE = (
    ", not a score: a metric returns a number, a bool or dspy.Prediction(score=...) for every "
    "answer, right or wrong (a function that ends without `return` returns None)"
)


def metric_number(value: Any) -> float | None:
    """A metric's result as a number (a bool, or a dspy.Prediction's `score` as DSPy reads
    it); None for anything else (None, a string, NaN)."""
    try:
        number = float(value)
    except (TypeError, ValueError, AttributeError, KeyError):
        return None
    return number if math.isfinite(number) else None
