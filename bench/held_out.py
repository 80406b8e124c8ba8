"""A spec's calibration and test parts exactly as `edgedistill build` splits them (the same
context loads them, so a bench answers the rows the build's report and calibration used)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_parts(spec_path: Path) -> tuple[list[Any], list[Any]]:
    from rich.console import Console

    from services.builder.context import BuildContext
    from services.builder.spec import load_spec

    context = BuildContext.load(load_spec(spec_path), Console(quiet=True))
    return context.calibset, context.testset
