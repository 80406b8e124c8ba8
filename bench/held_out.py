"""A spec's build context, as `edgedistill build` loads it: its calibration and test parts
are exactly the build's, so a bench answers the rows the build's report and calibration used."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_context(spec_path: Path) -> Any:
    from rich.console import Console

    from services.builder.context import BuildContext
    from services.builder.spec import load_spec

    return BuildContext.load(load_spec(spec_path), Console(quiet=True))
