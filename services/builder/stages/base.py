"""What a build stage is, how its cache key is derived, and the runner that skips or runs it.

A stage declares a name, the upstream stages and settings its key comes from, and a `run`
that writes only into the folder it is given. The runner derives every key the same way:
a rerun with the same key is skipped; a stage writes into `BUILD/.<folder>.partial` and is
renamed into place only when complete, so an interrupted stage leaves nothing that looks done.
Each finished folder carries the id of the run that made it, and a stage's key takes its
upstream stages' run ids: a stage that runs again (its folder removed, a training that is not
bit-for-bit repeatable) runs every stage after it again, so no folder is derived from another
run's results.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services.builder import host_cache

if TYPE_CHECKING:
    from services.builder.context import BuildContext

STAGE_FILE = ".stage.json"

Inputs = Callable[["BuildContext"], dict[str, Any]]


def no_inputs(ctx: BuildContext) -> dict[str, Any]:
    return {}


def always(ctx: BuildContext) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One build stage.

    `after`: upstream stages whose keys enter this one's (a stage that did not apply counts as
    None). `inputs`: the settings and file hashes it depends on besides those. `run(ctx, out)`
    writes its results into `out`. `report(ctx, folder)` prints its summary whether it ran or
    was skipped. `folder`: where it is published under BUILD/ (default: its name).
    `host_shared`: its output follows from its key alone, so other builds on this host take it
    from the host cache (services/builder/host_cache.py) instead of running it again.
    `version`: raised when a change to `run` changes what it writes, so that folders an older
    edgedistill wrote are made again (and every stage after them), not reused.
    `kept_when_failed`: a failed run's folder stays (as BUILD/.<folder>.partial, until the
    stage runs again) because its error names files there, such as each row that failed.
    """

    name: str
    run: Callable[[BuildContext, Path], None]
    after: tuple[str, ...] = ()
    inputs: Inputs = no_inputs
    applies: Callable[[BuildContext], bool] = always
    report: Callable[[BuildContext, Path], None] | None = None
    folder: str = ""
    host_shared: bool = False
    version: int = 1
    kept_when_failed: bool = False

    @property
    def folder_name(self) -> str:
        return self.folder or self.name


def stage_key(stage: Stage, ctx: BuildContext) -> str:
    """The one key derivation: the stage's name and version, its upstream keys and its own
    inputs."""
    payload = {
        "stage": stage.name,
        "version": stage.version,
        "after": {name: ctx.keys.get(name) for name in stage.after},  # key and run id each
        "inputs": stage.inputs(ctx),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class StageRunner:
    """Runs stages in order; records which ran and which were skipped."""

    root: Path
    console: Console
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def run(self, stage: Stage, ctx: BuildContext) -> None:
        if not stage.applies(ctx):
            return
        key = stage_key(stage, ctx)
        final = self.root / stage.folder_name
        if finished(final)[0] == key:
            self.console.print(f"[dim]• {stage.name}: inputs unchanged, skipped[/]")
            self.skipped.append(stage.name)
        elif stage.host_shared and (cached := host_cache.stage_entry(stage.name, key)):
            self.console.print(f"[dim]• {stage.name}: linked from the host cache ({cached})[/]")
            self._publish_cached(stage, cached, final)
            self.skipped.append(stage.name)
        else:
            self.console.print(f"[bold]• {stage.name}[/]")
            seconds = self._run_staged(stage, ctx, key, final)
            self.console.print(f"  [green]done[/] in {seconds:.1f} s")
            self.ran.append(stage.name)
            if stage.host_shared and (why := host_cache.keep_stage(stage.name, key, final)):
                self.console.print(f"  [yellow]not kept in the host cache[/]: {why}")
        ctx.dirs[stage.name], ctx.keys[stage.name] = final, f"{key}/{finished(final)[1]}"
        if stage.report is not None:
            stage.report(ctx, final)

    def _publish_cached(self, stage: Stage, cached: Path, final: Path) -> None:
        self._publish_filled(stage, final, lambda staging: host_cache.link_tree(cached, staging))

    def _run_staged(self, stage: Stage, ctx: BuildContext, key: str, final: Path) -> float:
        seconds = 0.0

        def run(staging: Path) -> None:
            nonlocal seconds
            staging.mkdir()
            started = time.perf_counter()
            stage.run(ctx, staging)
            seconds = time.perf_counter() - started
            marker = {"key": key, "run": uuid.uuid4().hex, "seconds": round(seconds, 1)}
            (staging / STAGE_FILE).write_text(json.dumps(marker))

        self._publish_filled(stage, final, run)
        return seconds

    def _publish_filled(self, stage: Stage, final: Path, fill: Callable[[Path], None]) -> None:
        """`fill` writes the stage's staging folder, which then replaces `final` whole."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".{stage.folder_name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            fill(staging)
        except BaseException as err:
            if not (stage.kept_when_failed and isinstance(err, Exception)) or disk_full(err):
                shutil.rmtree(staging, ignore_errors=True)  # frees what a full disk needs back
            raise
        _publish(staging, final)


def share_stages(first: Path, build_dir: Path, names: tuple[str, ...]) -> None:
    """Another build's finished stage folders, for this one: same keys, so the runner skips
    them (an API teacher is not asked twice, weights are not converted twice). Hard links: no
    second copy; stages never write into a published folder."""
    for name in names:
        source, target = first / name, build_dir / name
        if source.is_dir() and first != build_dir and not target.exists():
            build_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source, target, copy_function=os.link)


def disk_full(err: BaseException) -> bool:
    """Out of space or over a quota: either way the fix is the same (free space, run again)."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def _publish(staging: Path, final: Path) -> None:
    """Put `staging` in place of `final`; readers see the old folder or the new one."""
    if not final.exists():
        os.replace(staging, final)
        return
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def finished(folder: Path) -> tuple[str | None, str]:
    """A finished stage folder's key and the id of the run that made it (None and "" for a
    folder no run finished)."""
    marker = folder / STAGE_FILE
    if not marker.is_file():
        return None, ""
    written = json.loads(marker.read_text())
    return written.get("key"), str(written.get("run", ""))


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("  {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
