"""The router's harvest (opt-in, `--harvest DIR`): every fallback, and a sample of local
answers, appended to size-capped JSON-lines files readable only by the router's user, oldest
files removed past the retention limits. The record format is services/core/harvest.py."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.core.harvest import RECORD_GLOB, HarvestRecord

RETENTION_CHECK_S = 60.0  # the age limit is applied at least this often while writing


@dataclass(frozen=True)
class StoredFile:
    name: str
    records: int
    age_s: float


def expired(files: list[StoredFile], max_records: int | None, max_age_s: float | None) -> list[str]:
    """Files to remove, oldest first: past the age limit, or while the records kept exceed
    the count limit. `files` is oldest first; the newest (being written) always stays."""
    doomed = []
    kept = sum(f.records for f in files)
    for stored in files[:-1]:
        too_old = max_age_s is not None and stored.age_s > max_age_s
        too_many = max_records is not None and kept > max_records
        if not (too_old or too_many):
            break
        doomed.append(stored.name)
        kept -= stored.records
    return doomed


class HarvestWriter:
    def __init__(
        self,
        folder: Path,
        *,
        max_file_bytes: int,
        max_records: int | None,
        max_age_s: float | None,
        sample_rate: float,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self._folder = folder
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        folder.chmod(0o700)
        self._max_file_bytes = max_file_bytes
        # Files hold at most an eighth of the count limit, so the limit holds within an eighth.
        self._max_file_records = max(1, max_records // 8) if max_records else None
        self._max_records = max_records
        self._max_age_s = max_age_s
        self._sample_rate = sample_rate
        self._draw = draw
        self._current: Path | None = None
        self._current_records = 0
        self._sequence = 0
        self._checked_at = 0.0
        self.enforce_retention()

    def wants_sample(self) -> bool:
        return self._sample_rate > 0 and self._draw() < self._sample_rate

    def write(self, record: HarvestRecord) -> None:
        line = (record.model_dump_json() + "\n").encode()
        path = self._file_for(len(line))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        self._current_records += 1
        if time.monotonic() - self._checked_at > RETENTION_CHECK_S:
            self.enforce_retention()

    def records_on_disk(self) -> int:
        return sum(_count(p) for p in self._folder.glob(RECORD_GLOB))

    def _file_for(self, size: int) -> Path:
        current = self._current
        full = current is not None and (
            current.stat().st_size + size > self._max_file_bytes
            or (self._max_file_records and self._current_records >= self._max_file_records)
        )
        if current is None or full:
            self._sequence += 1
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            name = f"harvest-{stamp}-{os.getpid()}-{self._sequence:06d}.jsonl"
            self._current = self._folder / name
            self._current_records = 0
            if full:
                self.enforce_retention()
        assert self._current is not None
        return self._current

    def enforce_retention(self) -> None:
        self._checked_at = time.monotonic()
        paths = sorted(self._folder.glob(RECORD_GLOB), key=lambda p: p.stat().st_mtime)
        now = time.time()
        stored = [StoredFile(p.name, _count(p), now - p.stat().st_mtime) for p in paths]
        if self._current is not None and not self._current.exists():
            stored.append(StoredFile(self._current.name, 0, 0.0))  # the next file to write
        for name in expired(stored, self._max_records, self._max_age_s):
            (self._folder / name).unlink(missing_ok=True)


def _count(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for _ in handle)
