"""From settings to a loaded model: a GGUF (+ program.json) or a verified bundle."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.core.bundle import Bundle, BundleError, failed_gate
from services.core.config import RuntimeSettings
from services.core.program import ProgramFormatError, ProgramSpec, PromptCodec, program_from_file
from services.runtime.backends import Backend, BackendError, registry
from services.runtime.backends.registry import ModelSource

log = logging.getLogger(__name__)


class LoadError(RuntimeError):
    """The model or program cannot be served; the message says why and what to do."""


@dataclass
class LoadedModel:
    backend: Backend
    program: ProgramSpec | None
    codec: PromptCodec | None
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
    program = program_from_file(program_path) if program_path else None
    codec = PromptCodec(program) if program else None

    source = ModelSource(settings.model, bundle, settings.variant, codec)
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
        bundle_version=bundle.manifest.version if bundle else "",
    )
