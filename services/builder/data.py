"""Datasets: rows of field -> value read from JSONL, JSON or CSV, checked, keyed and split."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Literal

from services.builder.spec import SpecError
from services.core.program import (
    FieldSpec,
    blank_as_none,
    choice_values,
    input_text,
    label_text,
)
from services.core.rows import RowsError, read_row_file

# dspy.ChainOfThought's added output: the teacher writes it; datasets need not label it.
REASONING = "reasoning"
# A row's optional problem id: rows restating one problem stay on one side of a split. Not a
# field of the program, so never an input or a label.
GROUP = "group"


def labelled(output_names: list[str]) -> list[str]:
    """The output fields a dataset row must carry (all but the reasoning)."""
    return [name for name in output_names if name != REASONING]


def unreasoned_rows(rows: list[Any]) -> int:
    """Rows that leave the reasoning out or blank: a gold teacher would train the student to
    skip its ChainOfThought's reasoning on them."""
    return sum(not str(row.get(REASONING) or "").strip() for row in rows)


def load_examples(
    path: Path, input_names: list[str], output_names: list[str], key: str,
    optional: Collection[str] = (),
) -> list[Any]:  # fmt: skip
    """dspy.Examples from the rows; every row needs the program's input and labelled output
    fields, but for the `optional` inputs (forward's parameters with defaults)."""
    return load_grouped(path, input_names, output_names, key, optional)[0]


def load_grouped(
    path: Path, input_names: list[str], output_names: list[str], key: str,
    optional: Collection[str] = (),
) -> tuple[list[Any], list[str]]:  # fmt: skip
    """The examples and each row's group (its `group` value, or a group of its own)."""
    import dspy

    examples: list[Any] = []
    groups: list[str] = []
    for where, row in read_rows(path, key):
        for name in input_names + labelled(output_names):
            if name not in row and name not in optional:
                raise SpecError(
                    f"{key}: {path} {where}: missing field {name!r} (the row has "
                    f"{', '.join(map(repr, row)) or 'no fields'}); every row carries the "
                    f"program's fields: {', '.join(input_names + labelled(output_names))}"
                )
        group = None if GROUP in input_names + output_names else row.pop(GROUP, None)
        example = dspy.Example(**row).with_inputs(*input_names)
        examples.append(example)
        own = f"{key}:{where.rsplit(' ', 1)[-1]}"  # a JSONL row's: `data.train:12`, as always
        groups.append(own if group in (None, "") else str(group))
    if not examples:
        raise SpecError(f"{key}: {path} has no examples")
    return examples, groups


def check_values(
    path: Path, key: str, types: dict[str, Any], inputs: Sequence[FieldSpec] = (),
    unanswered: Callable[[dict[str, Any]], Collection[str]] = lambda row: (),
) -> None:  # fmt: skip
    """Every labelled output value is one its field's type accepts, as DSPy parses answers (a
    Literal's label among its values, an int a number): a label the served model could never
    give would be trained on and scored against, silently. Every typed input is a value the
    runtime accepts (a request with it would be INVALID_ARGUMENT). A row's `unanswered` fields
    are exempt: no predictor answers them there (a multi-step program's Python writes them)."""
    for where, row in read_rows(path, key):
        for field in inputs:
            problem = field.input_error(input_text(row[field.name])) if field.name in row else None
            if problem:
                raise SpecError(
                    f"{key}: {path} {where}: input {field.name} {problem}; fix the row, or the "
                    "field's type in the signature"
                )
        for name, annotation in types.items():
            if name == REASONING or name not in row or parses(row[name], annotation):
                continue
            if name not in unanswered(row):
                raise SpecError(
                    f"{key}: {path} {where}: {name} {row[name]!r} is not a "
                    f"{_type_text(annotation)}; fix the row, or the field's type in the signature"
                )


def parses(value: Any, annotation: Any) -> bool:
    from dspy.adapters.utils import parse_value

    if annotation is str:
        return True
    try:
        parse_value(blank_as_none(value, annotation), annotation)
    except Exception:  # whatever DSPy's parser refuses, it would refuse from the model
        return False
    return True


def _type_text(annotation: Any) -> str:
    import enum
    from typing import get_args, get_origin

    from dspy.adapters.utils import get_annotation_name

    if get_origin(annotation) is Literal:
        return "value of the field (one of: " + ", ".join(map(str, get_args(annotation))) + ")"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "value of the field (one of: " + ", ".join(str(m.value) for m in annotation) + ")"
    return f"valid {get_annotation_name(annotation)}"


def read_rows(path: Path, key: str) -> list[tuple[str, dict[str, Any]]]:
    """A dataset's rows (services/core/rows.py), a file it cannot read a SpecError."""
    try:
        return read_row_file(path, key)
    except RowsError as err:
        raise SpecError(str(err)) from None


def split_by_group(
    groups: list[str], calibration_fraction: float, seed: int, strata: list[str] | None = None
) -> tuple[list[int], list[int]]:
    """Row indices of the calibration and test parts. Whole groups are drawn in a seeded order
    until the calibration part holds its fraction of the rows, so no group is on both sides;
    with `strata` (a label per row), separately within each label, so both parts keep the
    label mix."""
    strata = strata or [""] * len(groups)
    stratum_of = {group: stratum for group, stratum in zip(groups, strata, strict=True)}
    sizes = Counter(groups)
    rng = random.Random(seed)
    calibration_groups: set[str] = set()
    for stratum in sorted(set(stratum_of.values())):
        order = sorted(g for g in sizes if stratum_of[g] == stratum)
        rng.shuffle(order)
        wanted = round(calibration_fraction * sum(sizes[g] for g in order))
        size = 0
        for group in order:
            if size >= wanted:
                break
            calibration_groups.add(group)
            size += sizes[group]
    calibration = [i for i, g in enumerate(groups) if g in calibration_groups]
    test = [i for i, g in enumerate(groups) if g not in calibration_groups]
    return calibration, test


def label_fields(
    rows: list[Any], fields: list[str], choices: Collection[str] = (), max_values: int = 20
) -> list[str]:
    """The output fields that are labels, not free text: a field typed as a choice (`choices`:
    a Literal, an Enum, a bool) however many values it has, or one with few distinct values in
    `rows`, each repeated on average."""
    limit = min(max_values, len(rows) // 2)
    return [name for name in fields
            if name in choices or 0 < len({normalize(e[name]) for e in rows}) <= limit]  # fmt: skip


def choice_fields(types: dict[str, Any]) -> list[str]:
    """The fields whose type is a choice among fixed values: Literal, Enum, bool."""
    return [name for name, annotation in types.items() if choice_values(annotation) is not None]


def label_counts(examples: list[Any], name: str) -> Counter[str]:
    return Counter(normalize(e[name]) for e in examples if name in e)


def imbalance(counts: Counter[str], values: int) -> str | None:
    """A warning when one value is over twice as common as an even share (and over 80% for a
    yes/no field): a student can score well by always saying it."""
    total = sum(counts.values())
    top, top_count = counts.most_common(1)[0]
    if values > 1 and top_count / total > min(0.8, 2 / values):
        return f"{top!r} is {top_count / total:.0%} of the rows"
    return None


def unseen_in_train(counts: Counter[str], train: Counter[str], choice: bool = True) -> str | None:
    """A warning when held-out rows carry a label no train row has: the student is never
    shown it, so those rows are scored against an answer it cannot have learned. For a field
    not typed as a choice (`str` with few values), the value may instead be read from the
    input (extraction), which needs no train row: the warning says both."""
    unseen = [value for value in counts if value not in train]
    if not train or not unseen:
        return None
    rows = sum(counts[value] for value in unseen)
    shown = ", ".join(repr(value) for value in sorted(unseen))
    said = f"{shown} ({rows} of {sum(counts.values())} rows) in no train row"
    if choice:
        return f"{said}: the student never sees it; add train rows with it"
    return (f"{said}: as labels the student never sees them (add train rows with them); "
            "values read from the input need none")  # fmt: skip


def untaught_labels(kept: Counter[str], asked: Counter[str]) -> str | None:
    """A warning when rows the teacher was asked hold a label no kept trace answers: its
    answers there failed the metric (or its calls failed), so the student is never shown
    that label."""
    missing = [value for value in asked if value not in kept]
    if not missing:
        return None
    rows = sum(asked[value] for value in missing)
    shown = ", ".join(repr(value) for value in sorted(missing))
    return (
        f"{shown} ({rows} of {sum(asked.values())} train rows) in no kept trace: no answer of "
        "the teacher's there passed the metric, so the student never learns to give it; "
        "improve the teacher (teacher.optimize, a stronger model) or check the metric"
    )


def normalize(value: Any) -> str:
    """A value as labels are counted and shown (program.label_text)."""
    return label_text(value)


def json_line(record: dict[str, Any]) -> str:
    """A trace as a JSONL line: a typed value (a pydantic model a teacher answered) as its
    JSON data, as a label row holds it, not Python's repr of it."""
    from pydantic_core import to_jsonable_python

    def jsonable(value: Any) -> Any:
        return to_jsonable_python(value, fallback=str)

    return json.dumps(record, ensure_ascii=False, default=jsonable) + "\n"


def input_key(inputs: dict[str, Any]) -> str:
    """The same for inputs that differ only in case and spacing: how the build tells whether
    a trace's inputs are among the held-out ones. A typed value is keyed as the wire carries
    it (JSON), so a row's list and a request's JSON text of it are the same input."""
    canonical = json.dumps({k: normalize(input_text(v)) for k, v in inputs.items()},
                           sort_keys=True)  # fmt: skip
    return hashlib.sha256(canonical.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    from services.core.bundle import sha256_file

    return sha256_file(path)
