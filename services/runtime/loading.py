"""From settings to a loaded model: a GGUF (+ program.json) or a verified bundle."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from services.core.bundle import Bundle, BundleError, failed_gate
from services.core.config import RuntimeSettings
from services.core.pipeline import PipelineSpec, ProgramRunner, read_program_file
from services.core.program import ProgramFormatError, ProgramSpec, PromptCodec
from services.runtime.backends import Backend, BackendError, registry
from services.runtime.backends.registry import ModelSource

log = logging.getLogger(__name__)


class LoadError(RuntimeError):
    """The model or program cannot be served; the message says why and what to do."""


@dataclass(frozen=True)
class LoadedProgram:
    """A program file read for serving: a single predictor's codec, or a multi-step
    program's runner (its code, imported now) and one codec per predictor."""

    spec: ProgramSpec | PipelineSpec | None = None
    codec: PromptCodec | None = None
    runner: ProgramRunner | None = None

    @property
    def codecs(self) -> tuple[PromptCodec, ...]:
        if self.codec is not None:
            return (self.codec,)
        return tuple(self.runner.codecs.values()) if self.runner else ()


def load_program(path: Path | None) -> LoadedProgram:
    """The program at `path` (None: no program, raw generation only)."""
    if path is None:
        return LoadedProgram()
    spec = read_program_file(path)
    if isinstance(spec, PipelineSpec):
        return LoadedProgram(spec, runner=ProgramRunner.load(path, spec))
    return LoadedProgram(spec, codec=PromptCodec(spec))


@dataclass
class LoadedModel:
    backend: Backend
    program: LoadedProgram
    bundle_version: str = ""


def load_model(settings: RuntimeSettings) -> LoadedModel:
    try:
        return _load(settings)
    except (BundleError, ProgramFormatError, BackendError, ValueError) as err:
        raise LoadError(str(err)) from err


def _load(settings: RuntimeSettings) -> LoadedModel:
    bundle = Bundle.open(settings.bundle) if settings.bundle else None
    if bundle is not None and not settings.allow_failed_gate:
        refusal = failed_gate(bundle.manifest)
        if refusal:
            raise LoadError(refusal)
    program = load_program(bundle.program_path if bundle else settings.program)
    source = ModelSource(settings.model, bundle, settings.variant, program.codecs)
    backend = registry.get(settings.backend).create(settings, source)
    info = backend.info
    log.info(
        "model loaded",
        extra={
            "model": info.model_name,
            "quantization": info.quantization,
            "backend": info.backend,
            "program": program.spec.name if program.spec else None,
        },
    )
    return LoadedModel(
        backend=backend,
        program=program,
        bundle_version=bundle.manifest.version if bundle else "",
    )
