"""Small bundles around the real SmolLM2 GGUF, for tests and benches."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

# A tiny program the untuned SmolLM2 answers in DSPy's format thanks to two demos.
CAPITALS_PROGRAM = {
    "name": "capitals",
    "instructions": "Answer with the capital city of the given country.",
    "inputs": [{"name": "country", "description": "a country name", "type": "str"}],
    "outputs": [{"name": "capital", "description": "its capital city", "type": "str"}],
    "demos": [
        {"country": "France", "capital": "Paris"},
        {"country": "Japan", "capital": "Tokyo"},
    ],
}


def make_bundle(
    root: Path,
    gguf_path: Path,
    program: Mapping[str, object],
    threshold: float | None = None,
    version: str = "2026.11.29-1",
) -> Path:
    """A bundle around a GGUF and a program (with a router calibration when `threshold`)."""
    from services.core.bundle import Manifest, write_manifest

    (root / "model").mkdir(parents=True)
    (root / "program").mkdir()
    shutil.copy(gguf_path, root / "model" / "student.Q4_1.gguf")
    (root / "program" / "program.json").write_text(json.dumps(dict(program)))
    if threshold is not None:
        (root / "calibration.json").write_text(json.dumps({"threshold": threshold}))
    write_manifest(
        root,
        Manifest(
            name="capitals",
            version=version,
            default_model="model/student.Q4_1.gguf",
            models={"Q4_1": "model/student.Q4_1.gguf"},
            calibration="calibration.json" if threshold is not None else None,
        ),
    )
    return root
