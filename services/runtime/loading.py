"""From settings to a loaded model: a GGUF (+ program.json) or a verified bundle."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from services.core.bundle import Bundle, BundleError
from services.core.config import RuntimeSettings
from services.core.program import ProgramFormatError, ProgramSpec, PromptCodec, program_from_file
from services.core.tokens import common_prefix_length
from services.runtime.backends import Backend, BackendError

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


def _llamacpp_backend(
    settings: RuntimeSettings,
    model_path: Path,
    name: str | None,
    sha: str | None,
    codec: PromptCodec | None,
) -> Backend:
    if settings.parallel == 1:
        from services.runtime.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(
            model_path,
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads,
            n_batch=settings.n_batch,
            n_gpu_layers=settings.n_gpu_layers,
            model_name=name,
            gguf_sha256=sha,
        )
    from services.runtime.backends.llamacpp_batched import BatchedLlamaCpp

    batched = BatchedLlamaCpp(
        model_path,
        n_ctx=settings.n_ctx,
        n_threads=settings.n_threads,
        parallel=settings.parallel,
        n_batch=settings.n_batch,
        n_gpu_layers=settings.n_gpu_layers,
        model_name=name,
        gguf_sha256=sha,
    )
    if codec is not None and settings.prefix_cache:
        batched.set_prefix(program_prefix(batched, codec))  # evaluated by the scheduler's thread
    return batched


def program_prefix(backend: Backend, codec: PromptCodec) -> list[int]:
    """The prompt tokens every Predict of this program starts with, whatever its inputs."""
    renders = [
        backend.prepare(codec.format_messages({name: value for name in codec.input_names}))
        for value in ("a", "zq 7")
    ]
    tokens = [r.tokens for r in renders if r.tokens is not None]
    return list(tokens[0][: common_prefix_length(tokens)]) if len(tokens) == 2 else []


def _load(settings: RuntimeSettings) -> LoadedModel:
    bundle = Bundle.open(settings.bundle) if settings.bundle else None
    program_path = bundle.program_path if bundle else settings.program
    program = program_from_file(program_path) if program_path else None
    codec = PromptCodec(program) if program else None

    backend: Backend
    if settings.backend == "ollama":
        from services.runtime.backends.ollama_client import OllamaBackend

        model_name = settings.ollama_model or (bundle.manifest.name if bundle else "")
        backend = OllamaBackend(settings.ollama_host, model_name, n_ctx=settings.n_ctx)
    else:
        if bundle:
            model_path = bundle.model_path(settings.variant)
            sha = bundle.model_sha256(settings.variant)
            name = bundle.manifest.name
        else:
            assert settings.model is not None
            model_path, sha, name = settings.model, None, None
        backend = _llamacpp_backend(settings, model_path, name, sha, codec)
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
