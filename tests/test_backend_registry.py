"""Backends register in one place; the runtime's settings and loading come from the registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.config import SettingsError, load_settings
from services.core.stats import percentile
from services.runtime.backends import registry
from services.runtime.settings import settings_class


def test_every_backend_module_is_registered_with_its_own_settings() -> None:
    entries = registry.entries()
    assert set(entries) >= {"llama.cpp", "ollama"}
    assert set(entries["ollama"].options) == {"ollama_host", "ollama_model"}
    fields = settings_class().model_fields
    assert {"ollama_host", "ollama_model", "backend", "n_ctx"} <= set(fields)


def test_the_chosen_backend_checks_the_settings(gguf_path: Path) -> None:
    cls = settings_class()
    assert load_settings(cls, model=str(gguf_path)).backend == "llama.cpp"
    settings = load_settings(cls, backend="ollama", ollama_model="smol")
    assert settings.ollama_model == "smol"  # type: ignore[attr-defined]
    with pytest.raises(SettingsError, match=r"ollama_model \(--ollama-model"):
        load_settings(cls, backend="ollama")
    with pytest.raises(SettingsError, match=r"model \(--model / EDGEDISTILL_MODEL\)"):
        load_settings(cls)
    with pytest.raises(SettingsError, match=r"'vllm' is not a backend \(known: llama.cpp, ollama"):
        load_settings(cls, backend="vllm", model=str(gguf_path))


def test_a_name_registered_twice_is_refused() -> None:
    existing = registry.get("llama.cpp")
    assert registry.register(existing) is existing  # importing a module twice is harmless
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(registry.BackendEntry("llama.cpp", existing.create))


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([5.0, 1.0, 3.0, 2.0, 4.0], 0.5, 3.0),  # rank round(0.5 * 4) = 2 of 1..5 sorted
        ([5.0, 1.0, 3.0, 2.0, 4.0], 0.95, 5.0),  # rank round(3.8) = 4
        ([1.0, 2.0, 3.0, 4.0], 0.5, 3.0),  # rank round(1.5) = 2 (half to even)
        (list(range(101)), 0.99, 99.0),
        ([7.0], 0.95, 7.0),
        ([], 0.5, 0.0),
    ],
)
def test_percentile_is_nearest_rank(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == expected


def test_percentile_refuses_a_fraction_outside_zero_one() -> None:
    with pytest.raises(ValueError, match="q must be in"):
        percentile([1.0], 95)
