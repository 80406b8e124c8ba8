"""Folders for module-scoped fixtures that go away with the fixture.

A build folder holds several copies of a model (dense weights, merged weights, F16 and quantized
GGUFs, the bundle): gigabytes. pytest keeps a module fixture's folder to the end of the session,
so a suite of builds would need their sum on disk; removing each at its fixture's teardown needs
only the largest.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def scratch(factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    path = factory.mktemp(name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
