"""`edgedistill predict --rows`: every row of a file answered by the served program, one JSON
line per row in the file's order; a row that fails is a line saying why, and the rest go on.

Rows are read as a build reads its data (services/core/rows.py). Each call sends the row's
fields the program takes as inputs; other columns (an id, a label) are not sent. Where rows
carry an output field's value, the summary says how many answers agree with it."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.core.program import label_text
from services.core.rows import RowsError, read_row_file, rows_of, utf8_text
from services.core.stats import wilson_interval

Row = tuple[str, dict[str, Any]]  # where it is in the file, its fields


def load_rows(source: str) -> list[Row]:
    """The file's rows; `-`: JSONL (or a JSON array) on stdin."""
    if source == "-":
        text = utf8_text(sys.stdin.buffer.read(), "--rows: stdin")
        return rows_of(text, ".jsonl", "--rows: stdin")
    path = Path(source)
    if not path.is_file():
        raise RowsError(f"--rows: {source}: no such file")
    rows = read_row_file(path, "--rows")
    if not rows:
        raise RowsError(f"--rows: {source} has no rows")
    return rows


def request_inputs(row: dict[str, Any], input_names: list[str]) -> dict[str, Any]:
    """The row's values for the program's inputs; a missing one is left to the server to name."""
    return {name: row[name] for name in input_names if name in row}


def agrees(answer: Any, label: Any) -> bool:
    """An answer as a row's label writes it, as the build counts labels: a CSV's text `3` is
    the int 3, case and spacing aside."""
    return label_text(answer) == label_text(label)


@dataclass
class Tally:
    """What the rows' answers came to, for the summary."""

    rows: int = 0
    failed: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    served_by: dict[str, int] = field(default_factory=dict)
    agreeing: dict[str, list[int]] = field(default_factory=dict)  # field -> [agree, compared]

    def add(self, row: dict[str, Any], line: dict[str, Any], output_names: list[str]) -> None:
        self.rows += 1
        if "error" in line:
            self.failed += 1
            return
        for key, counts in (("outcome", self.outcomes), ("served_by", self.served_by)):
            said = _short(str(line.get(key, "")))
            counts[said] = counts.get(said, 0) + 1
        answers = line.get("outputs") or {}
        for name in output_names:
            if name in row:
                seen = self.agreeing.setdefault(name, [0, 0])
                seen[0] += name in answers and agrees(answers[name], row[name])
                seen[1] += 1

    def summary(self) -> list[str]:
        answered = self.rows - self.failed
        lines = [
            f"answered {answered} of {self.rows} rows"
            + (f"; {self.failed} failed (their lines say why)" if self.failed else "")
        ]
        if answered:
            lines.append("outcome: " + _counts(self.outcomes) + "; by: " + _counts(self.served_by))
        for name, (agree, compared) in self.agreeing.items():
            low, high = wilson_interval(agree, compared)
            lines.append(
                f"{name}: {agree} of {compared} answers agree with the rows' {name} "
                f"({agree / compared:.1%}, 95% interval {low:.1%}–{high:.1%})"
            )
        return lines


def _short(enum_name: str) -> str:
    """`PREDICT_OUTCOME_PARSED` as `parsed`, `SERVED_BY_FALLBACK` as `fallback`."""
    return enum_name.removeprefix("PREDICT_OUTCOME_").removeprefix("SERVED_BY_").lower()


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda c: -c[1]))


def answered_in_order(
    rows: list[Row], answer: Callable[[dict[str, Any]], dict[str, Any]], concurrency: int
) -> Iterator[tuple[Row, dict[str, Any]]]:
    """Each row with its line, in the file's order, `concurrency` (at least 1) calls in flight."""
    with ThreadPoolExecutor(concurrency) as pool:
        yield from zip(rows, pool.map(lambda row: answer(row[1]), rows), strict=True)


def json_line(where: str, line: dict[str, Any]) -> str:
    return json.dumps({"row": where, **line}, ensure_ascii=False)
