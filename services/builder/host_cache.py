"""The host's cache of finished stage folders, for stages whose output follows from their key
alone (the dense copy of a base student): another build on this host with the same key links
the folder in instead of running the stage again.

`$EDGEDISTILL_STAGE_CACHE` (default `stages/` in the host's edgedistill cache,
`$XDG_CACHE_HOME/edgedistill` or `~/.cache/edgedistill`) holds `NAME/KEY/`; `off` turns it off.
Deleting it at any time is safe: an entry is renamed into place whole, and a build that finds
none runs the stage.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

STAGE_CACHE_ENV = "EDGEDISTILL_STAGE_CACHE"


def cache_root() -> Path:
    """Where edgedistill keeps what a host's builds share (wheels, students, stage folders)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "edgedistill")


def stage_folder() -> Path | None:
    """The stage cache; None when turned off."""
    given = os.environ.get(STAGE_CACHE_ENV)
    if given == "off":
        return None
    return Path(given) if given else cache_root() / "stages"


def stage_entry(name: str, key: str) -> Path | None:
    """The cached folder of stage `name` with `key`, when there is one."""
    folder = stage_folder()
    entry = folder / name / key if folder else None
    return entry if entry and entry.is_dir() else None


def link_tree(source: Path, target: Path) -> None:
    """`source`'s files at `target`: hard links where one filesystem holds both (no second
    copy; stages never write into a finished folder), copies elsewhere."""
    shutil.copytree(source, target, copy_function=link_or_copy, dirs_exist_ok=True)


def keep_stage(name: str, key: str, folder: Path) -> str | None:
    """Keep a finished stage folder for other builds; why it was not kept, else None. A cache
    that cannot be written (read-only, full) costs the next build a rerun, not this one."""
    if (cache := stage_folder()) is None:
        return None
    entry = cache / name / key
    partial = entry.with_name(f".{key}.{os.getpid()}.partial")
    try:
        if entry.is_dir():
            return None
        partial.parent.mkdir(parents=True, exist_ok=True)
        link_tree(folder, partial)
        os.replace(partial, entry)  # another build may have kept it first: then theirs stays
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        return None if entry.is_dir() else f"{type(err).__name__}: {err}"
    return None


def link_or_copy(source: str, target: str) -> str:
    """A hard link where one filesystem holds both, else a copy (a copytree copy_function)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target
