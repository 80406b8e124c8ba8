"""The model bundle: one folder the builder writes and the runtime and router read.

    BUNDLE/
      manifest.json        name, version, sha256 of every other file, the default model
      model/*.gguf         the distilled student, one file per quantization
      program/program.json the DSPy program without its LM (services.core.program)
      calibration.json     the router's confidence threshold (optional)
      Modelfile, eval.json, decision.json, report.md, report.html

A bundle is verified against its manifest before it is served: a changed byte is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

MANIFEST = "manifest.json"
BUNDLE_FORMAT_VERSION = 1


class BundleError(ValueError):
    """The bundle is missing, malformed or does not match its manifest."""


class FileEntry(BaseModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Manifest(BaseModel):
    format_version: int = BUNDLE_FORMAT_VERSION
    name: str
    version: str
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    default_model: str  # relative path of the GGUF served by default
    models: dict[str, str] = Field(default_factory=dict)  # quantization -> relative path
    program: str = "program/program.json"
    calibration: str | None = None
    files: dict[str, FileEntry] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write so that readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; bundles are read by unprivileged services
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(root: Path, manifest: Manifest) -> Manifest:
    """Hash every file under root (except the manifest) into the manifest and write it."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST or path.name.startswith("."):
            continue
        files[rel] = FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)
    manifest = manifest.model_copy(update={"files": files})
    atomic_write_text(root / MANIFEST, manifest.model_dump_json(indent=2) + "\n")
    return manifest


def failed_gate(manifest: Manifest) -> str | None:
    """Why a bundle must not be served by default: its model failed the build's quality gate
    (None when it passed or recorded no verdict)."""
    verdict = (manifest.provenance or {}).get("quality_gate")
    if not verdict or verdict.get("passed", True):
        return None
    return (
        f"{manifest.name} {manifest.version} failed its quality gate: the distilled model keeps "
        f"{verdict['retention']:.0%} of the teacher's quality, under the gate's "
        f"{verdict['min_retention']:.0%} (report.md in the bundle says more). Re-distill, or "
        "pass --allow-failed-gate to serve it anyway"
    )


class Bundle:
    """A bundle folder, read and checked."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, root: Path, *, verify: bool = True) -> Bundle:
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{root}: not a bundle (no {MANIFEST})")
        try:
            manifest = Manifest.model_validate_json(manifest_path.read_bytes())
        except ValueError as err:
            raise BundleError(f"{manifest_path}: malformed manifest: {err}") from err
        if manifest.format_version != BUNDLE_FORMAT_VERSION:
            raise BundleError(
                f"{root}: bundle format {manifest.format_version}; "
                f"this edgedistill reads {BUNDLE_FORMAT_VERSION}"
            )
        bundle = cls(root, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Check every file's size and sha256 against the manifest."""
        problems = []
        for rel, entry in self.manifest.files.items():
            path = self.root / rel
            if not path.is_file():
                problems.append(f"{rel}: missing")
            elif path.stat().st_size != entry.bytes:
                problems.append(f"{rel}: {path.stat().st_size} bytes, manifest says {entry.bytes}")
            elif sha256_file(path) != entry.sha256:
                problems.append(f"{rel}: sha256 differs from the manifest")
        for rel in (self.manifest.default_model, self.manifest.program):
            if rel not in self.manifest.files:
                problems.append(f"{rel}: named by the manifest but not listed in its files")
        if problems:
            raise BundleError(
                f"{self.root}: bundle does not match its manifest:\n  " + "\n  ".join(problems)
            )

    def model_path(self, variant: str | None = None) -> Path:
        if variant is None:
            return self.root / self.manifest.default_model
        if variant not in self.manifest.models:
            known = ", ".join(sorted(self.manifest.models)) or "none"
            raise BundleError(f"variant: bundle has no {variant!r} model (has: {known})")
        return self.root / self.manifest.models[variant]

    def model_sha256(self, variant: str | None = None) -> str:
        rel = self.model_path(variant).relative_to(self.root).as_posix()
        return self.manifest.files[rel].sha256

    @property
    def program_path(self) -> Path:
        return self.root / self.manifest.program

    def calibration(self) -> dict[str, Any] | None:
        if not self.manifest.calibration:
            return None
        data: dict[str, Any] = json.loads((self.root / self.manifest.calibration).read_text())
        return data
