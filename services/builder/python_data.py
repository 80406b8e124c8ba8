"""Rows a spec names in Python (`data: {train: "program:trainset"}`): a DSPy user's list of
`dspy.Example`s, dicts or pydantic models, a function returning one, a Hugging Face dataset or
a pandas DataFrame. They are written once as JSONL under the build folder and read from there
like any data file, so every check, error and cache key is a file's."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticSerializationError, to_jsonable_python

from services.builder.program_files import recording_reads
from services.builder.spec import IMPORT_PATH, SpecError, import_object


def names_python_rows(value: Path) -> bool:
    """`module:attribute`, not a file path (a file would have a suffix or a folder)."""
    return IMPORT_PATH.fullmatch(str(value)) is not None


def write_python_rows(where: str, key: str, program: str, out: Path) -> Path:
    """The rows `where` names, as JSONL at `out` (one object per row, in their order)."""
    # Importing the program's module here must not hide the files it reads as it is imported
    # from the build, which ships them with its code.
    same_module = where.partition(":")[0] == program.partition(":")[0]
    with recording_reads(program) if same_module else contextlib.nullcontext():
        found = import_object(where, key)
    rows = [_row(item, n, where, key) for n, item in enumerate(_items(found, where, key), 1)]
    if not rows:
        raise SpecError(f"{key}: {where} holds no rows")
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if not out.is_file() or out.read_text() != text:  # unchanged: not written (a read-only mount)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return out


def _items(found: Any, where: str, key: str) -> Iterable[Any]:
    if callable(found) and not isinstance(found, type):
        try:
            found = found()
        except Exception as err:
            raise SpecError(f"{key}: {where}() raised {type(err).__name__}: {err}") from err
    if hasattr(found, "columns") and hasattr(found, "to_dict"):  # a pandas DataFrame
        return list(found.to_dict(orient="records"))
    if isinstance(found, (str, bytes, Mapping)) or not isinstance(found, Iterable):
        raise SpecError(
            f"{key}: {where} is a {type(found).__name__}, not rows: name a list of dspy.Example "
            "or dicts (or a function returning one), or a data file (.jsonl, .json, .csv)"
        )
    return found


def _row(item: Any, n: int, where: str, key: str) -> dict[str, Any]:
    if isinstance(item, BaseModel):
        row: Any = item.model_dump(mode="json")
    elif hasattr(item, "toDict"):  # dspy.Example: its fields, without with_inputs' marks
        row = item.toDict()
    else:
        row = item
    if not isinstance(row, Mapping):
        raise SpecError(
            f"{key}: {where} item {n} is a {type(item).__name__}; a row is a dspy.Example, a "
            "dict of field -> value or a pydantic model"
        )
    return {
        str(name): _data(value, f"{key}: {where} item {n}, {name}") for name, value in row.items()
    }


def _data(value: Any, where: str) -> Any:
    try:
        return to_jsonable_python(value)
    except PydanticSerializationError as err:
        raise SpecError(f"{where}: not data a row can hold ({err})") from None
