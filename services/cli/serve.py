"""`edgedistill serve`: the runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from services.cli.common import app, fail, settings_options

if TYPE_CHECKING:
    from services.core.config import RuntimeSettings


def _runtime_settings_cls() -> type[RuntimeSettings]:
    from services.runtime.settings import settings_class

    return settings_class()


@app.command("serve")
@settings_options(_runtime_settings_cls())
def serve(overrides: dict[str, Any]) -> None:
    """Serve a GGUF model (and its DSPy program) over gRPC: Predict, Generate, GetModelInfo.

    Every flag also reads EDGEDISTILL_<NAME>, e.g. EDGEDISTILL_N_CTX=4096.
    """
    import asyncio

    from services.core.config import SettingsError, load_settings

    try:
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
