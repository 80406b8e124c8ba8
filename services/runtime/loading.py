"""From settings to a loaded model: a GGUF (+ program.json) or a verified bundle."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.core.bundle import Bundle, BundleError, failed_gate
from services.core.config import RuntimeSettings
from services.core.pipeline import PipelineSpec, ProgramRunner, read_program_file
from services.core.program import ProgramFormatError, ProgramSpec, PromptCodec
from services.runtime.backends import Backend, BackendError, registry
from services.runtime.backends.registry import ModelSource

log = logging.getLogger(__name__)


class LoadError(RuntimeError):
    """The model or program cannot be served; the message says why and what to do."""


@dataclass
class LoadedModel:
    backend: Backend
    program: ProgramSpec | PipelineSpec | None
    codec: PromptCodec | None  # a single-predictor program's
    runner: ProgramRunner | None = None  # a multi-step program's
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
    program_path = bundle.program_path if bundle else settings.program
    program = read_program_file(program_path) if program_path else None
    runner = codec = None
    if isinstance(program, PipelineSpec):
        assert program_path is not None
        runner = ProgramRunner.load(program_path, program)  # the program's code, at start
    elif program is not None:
        codec = PromptCodec(program)
    codecs = (codec,) if codec else tuple(runner.codecs.values()) if runner else ()
    source = ModelSource(settings.model, bundle, settings.variant, codecs)
    backend = registry.get(settings.backend).create(settings, source)
    info = backend.info
    log.info(
        "model loaded",
        extra={
            "model": info.model_name,
            "quantization": info.quantization,
            "backend": info.backend,
            "program": program.name if program else None,
        },
    )
    return LoadedModel(
        backend=backend,
        program=program,
        codec=codec,
        runner=runner,
        bundle_version=bundle.manifest.version if bundle else "",
    )
