"""`edgedistill serve`: the runtime."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from services.cli.common import app, fail, settings_options
from services.core.config import SettingsError

if TYPE_CHECKING:
    from services.core.config import RuntimeSettings


def _runtime_settings_cls() -> type[RuntimeSettings]:
    from services.runtime.settings import settings_class

    return settings_class()


def served_path(path: str, overrides: dict[str, Any]) -> dict[str, str]:
    """The setting a positional PATH stands for: a directory is a bundle, a file a GGUF."""
    if overrides.get("bundle") is not None or overrides.get("model") is not None:
        raise SettingsError(
            f"PATH {path}: give the bundle or model once, as PATH or as --bundle/--model"
        )
    given = Path(path)
    if given.is_dir():
        return {"bundle": path}
    if given.is_file():
        return {"model": path}
    raise SettingsError(
        f"PATH {path}: no such file or directory; give a bundle directory or a .gguf file"
    )


@app.command("serve")
@settings_options(
    _runtime_settings_cls(), path_help="a bundle directory or a .gguf file (or --bundle/--model)"
)
def serve(overrides: dict[str, Any], path: str | None) -> None:
    """Serve a GGUF model (and its DSPy program) over gRPC: Predict, Generate, GetModelInfo.

    `edgedistill serve build/bundle` serves a bundle, `edgedistill serve model.gguf` a model.
    Every flag also reads EDGEDISTILL_<NAME>, e.g. EDGEDISTILL_N_CTX=4096.
    """
    import asyncio

    from services.core.config import load_settings

    try:
        if path is not None:
            overrides = {**overrides, **served_path(path, overrides)}
        settings = load_settings(_runtime_settings_cls(), **overrides)
    except SettingsError as err:
        raise fail(str(err)) from None
    from services.core import logs
    from services.runtime.loading import LoadError
    from services.runtime.server import serve as run_server

    logs.configure(settings.log_level)

    def announce(port: int) -> None:
        print(f"edgedistill runtime listening on {settings.host}:{port}", flush=True)

    try:
        code = asyncio.run(run_server(settings, ready=announce))
    except LoadError as err:
        raise fail(f"cannot serve: {err}", code=3) from None
    except OSError as err:
        raise fail(str(err), code=3) from None
    raise typer.Exit(code)
