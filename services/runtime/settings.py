"""The runtime's settings: the core's RuntimeSettings plus each registered backend's own
settings, checked by the chosen backend (services/runtime/backends/registry.py)."""

from __future__ import annotations

from functools import cache
from typing import Any, cast

from pydantic import create_model

from services.core.config import RuntimeSettings
from services.runtime.backends import registry


class _BackendChecked(RuntimeSettings):
    def check_backend(self) -> None:
        registry.get(self.backend).check(self)


@cache
def settings_class() -> type[RuntimeSettings]:
    """RuntimeSettings with every backend's options as fields (flags and variables too)."""
    options: dict[str, Any] = {}
    for entry in registry.entries().values():
        options.update(entry.options)
    model = create_model("RuntimeSettings", __base__=_BackendChecked, **options)
    return cast(type[RuntimeSettings], model)
