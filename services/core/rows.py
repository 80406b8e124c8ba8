"""Rows from a file, as a build's data and `edgedistill predict --rows` read them: JSONL (one
object per line), a JSON array of objects (`.json`), or CSV with a header row (`.csv` or
`.tsv`, every value text), each row with where it is in the file (`line 3`, `row 2`)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any


class RowsError(ValueError):
    """A file that holds no rows as read here; the message names the file, where, and the fix."""


def read_row_file(path: Path, key: str) -> list[tuple[str, dict[str, Any]]]:
    """The file's rows; `key` (`data.train`, `--rows`) begins each error's message."""
    text = utf8_text(path.read_bytes(), f"{key}: {path}")
    return rows_of(text, path.suffix.lower(), f"{key}: {path}")


def rows_of(text: str, suffix: str, where: str) -> list[tuple[str, dict[str, Any]]]:
    """The rows in `text`, read as a file ending in `suffix` is."""
    if suffix in (".csv", ".tsv"):
        return _csv_rows(text, where)
    is_array = suffix == ".json" or text.lstrip().startswith("[")
    rows = _json_rows(text, where) if is_array else _jsonl_rows(text, where)
    for place, row in rows:
        if not isinstance(row, dict):
            raise RowsError(f"{where} {place}: a row is a JSON object")
    return rows


def utf8_text(data: bytes, where: str) -> str:
    """The bytes' text; a byte-order mark (as spreadsheets write) is not part of it."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise RowsError(
            f"{where} line {line}: not UTF-8 (byte {data[err.start]:#04x}); save the file "
            "as UTF-8 (a spreadsheet's 'CSV UTF-8')"
        ) from None


def _csv_rows(text: str, where: str) -> list[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=csv_delimiter(text))
    rows = [(f"row {n}", dict(row)) for n, row in enumerate(reader, 2)]
    for place, row in rows:  # DictReader pads a short row with None, keys a long one None
        if None in row or None in row.values():
            raise RowsError(
                f"{where} {place}: its values do not match the header's "
                f"{len(reader.fieldnames or [])} columns"
            )
    return rows


def csv_delimiter(text: str) -> str:
    """`,`; or `;` or a tab where the header row has that and no comma (a spreadsheet saved in
    a locale whose decimal mark is the comma writes `;`). The header holds field names, so
    unlike the values it has no comma of its own."""
    header = text.split("\n", 1)[0]
    if "," not in header:
        for other in (";", "\t"):
            if other in header:
                return other
    return ","


def _json_rows(text: str, where: str) -> list[tuple[str, Any]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise RowsError(f"{where}: not JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(items, list):
        raise RowsError(f"{where}: a .json dataset is an array of row objects")
    return [(f"item {n}", item) for n, item in enumerate(items, 1)]


def _jsonl_rows(text: str, where: str) -> list[tuple[str, Any]]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise RowsError(
                f"{where} line {n}: not JSON ({err.msg}); a .jsonl dataset is one JSON "
                "object per line (or give a .json array or a .csv)"
            ) from None
    return rows
