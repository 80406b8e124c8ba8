"""Where backends register: a name, the settings they add, a check of those settings and a
factory. Each backend is one module of this package that calls `register` when imported;
`entries()` imports them all, so adding a backend is adding its module (and its tests)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.core.bundle import Bundle
from services.core.program import PromptCodec
from services.runtime.backends.base import Backend

# Modules of this package that are not backends.
_NOT_BACKENDS = {"base", "registry", "text"}
_ENTRIES: dict[str, BackendEntry] = {}


@dataclass(frozen=True)
class ModelSource:
    """What the runtime was asked to serve, before a backend is chosen."""

    model: Path | None  # --model
    bundle: Bundle | None  # --bundle
    variant: str | None  # --variant, with a bundle
    # The program's codec, or a multi-step program's, one per predictor (their fixed prompt
    # prefixes can be kept evaluated); empty when no program is served.
    codecs: tuple[PromptCodec, ...] = ()

    def gguf(self) -> tuple[Path, str | None, str | None]:
        """The GGUF file, its sha256 (from the manifest) and model name, for GGUF backends."""
        if self.bundle is not None:
            return (
                self.bundle.model_path(self.variant),
                self.bundle.model_sha256(self.variant),
                self.bundle.manifest.name,
            )
        assert self.model is not None  # needs_gguf checked it at start
        return self.model, None, None


def needs_gguf(settings: Any) -> None:
    """The check of backends that serve a GGUF file: one of --model or --bundle."""
    if settings.model is None and settings.bundle is None:
        raise ValueError("model: give exactly one of --model PATH.gguf or --bundle DIR")


@dataclass(frozen=True)
class BackendEntry:
    """`options`: settings the backend adds, as pydantic field definitions named
    `<backend>_<option>` (flag `--<backend>-<option>`, variable `EDGEDISTILL_<BACKEND>_<OPTION>`).
    `check(settings)` raises ValueError("field: what is wrong") for settings it cannot serve.
    `create(settings, source)` loads the model."""

    name: str
    create: Callable[[Any, ModelSource], Backend]
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    check: Callable[[Any], None] = needs_gguf


def register(entry: BackendEntry) -> BackendEntry:
    if entry.name in _ENTRIES and _ENTRIES[entry.name] is not entry:
        raise ValueError(f"backend {entry.name!r} is registered twice")
    _ENTRIES[entry.name] = entry
    return entry


def entries() -> dict[str, BackendEntry]:
    """Every backend, by name (imports each backend module once)."""
    package = importlib.import_module("services.runtime.backends")
    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in _NOT_BACKENDS:
            importlib.import_module(f"services.runtime.backends.{module.name}")
    return dict(_ENTRIES)


def get(name: str) -> BackendEntry:
    known = entries()
    if name not in known:
        raise ValueError(f"backend: {name!r} is not a backend (known: {', '.join(sorted(known))})")
    return known[name]
