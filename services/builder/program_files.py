"""The files a program reads as it is imported and made: the optimized state its factory
`load()`s (`program.load("optimized.json")`), a label list its module opens. Its code runs again
where it is served (the runtime, the router's fallback), so they ship beside its source and the
code runs there from that folder, as it ran here.

Reads are seen through Python's `open` audit event, recorded only inside `recording_reads`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from services.core.pipeline import installed

_RECORDING: ContextVar[list[str] | None] = ContextVar("_RECORDING", default=None)
_HOOKED: list[bool] = []  # an audit hook cannot be removed: it is added once, then gated
# What each program path's reads were: its module is imported once per process, so a second
# build in it (the retrain loop's rounds) sees only its factory's reads.
_SEEN: dict[str, set[str]] = {}
_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND
_CODE = frozenset({".py", ".pyc", ".so", ".pyd"})


def _on_audit(event: str, args: tuple[Any, ...]) -> None:
    reads = _RECORDING.get()
    if reads is None or event != "open":
        return
    path, mode, flags = args
    if isinstance(path, int) or path is None:  # an open file descriptor
        return
    writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITES)
    if not writes:
        reads.append(os.fsdecode(path))


@contextmanager
def recording_reads(program: str) -> Iterator[set[str]]:
    """The paths opened for reading inside the block (and, for `program`, in earlier blocks
    of this process), as they were written; filled when the block ends."""
    if not _HOOKED:
        sys.addaudithook(_on_audit)
        _HOOKED.append(True)
    reads: list[str] = []
    seen = _SEEN.setdefault(program, set())
    token = _RECORDING.set(reads)
    try:
        yield seen
    finally:
        _RECORDING.reset(token)
        seen.update(os.path.abspath(p) if not _portable(p) else p for p in reads)


def program_files(reads: set[str], roots: list[Path]) -> dict[str, Path]:
    """Each file read under one of `roots` that is not code, an installed package's or hidden
    (a `.env` of keys, a tool's `.cache`): its path in the shipped folder (as the program wrote
    it when relative, else under its root) -> the file."""
    found: dict[str, Path] = {}
    for read in sorted(reads):
        file = Path(read).resolve()
        if not file.is_file() or file.suffix in _CODE or installed(file):
            continue
        root = next((r.resolve() for r in roots if file.is_relative_to(r.resolve())), None)
        if root is None:
            continue
        where = Path(read) if _portable(read) else file.relative_to(root)
        if any(part.startswith(".") for part in where.parts):  # .env, .cache: never shipped
            continue
        found[where.as_posix()] = file
    return found


def _portable(path: str) -> bool:
    """A relative path that stays inside the folder it is read from."""
    return not os.path.isabs(path) and ".." not in Path(path).parts
