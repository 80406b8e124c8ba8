"""`edgedistill route`: the router."""

from __future__ import annotations

from typing import Any

import typer
from pydantic_settings import BaseSettings

from services.cli.common import app, fail, settings_options


def _router_settings_cls() -> type[BaseSettings]:
    from services.core.config import RouterSettings

    return RouterSettings


def routed_bundle(path: str, overrides: dict[str, Any]) -> dict[str, str]:
    from services.core.config import SettingsError

    if overrides.get("bundle") is not None:
        raise SettingsError(f"PATH {path}: give the bundle once, as PATH or as --bundle")
    return {"bundle": path}


@app.command("route")
@settings_options(_router_settings_cls(), path_help="the bundle directory (or --bundle)")
def route(overrides: dict[str, Any], path: str | None) -> None:
    """Route Predict calls: local runtimes first, an API model for low-confidence answers.

    Every flag also reads EDGEDISTILL_ROUTER_<NAME>. The API key comes from
    --fallback-key-env VAR or --fallback-key-file PATH, never from the bundle or the image.
    """
    import asyncio

    from services.core.config import RouterSettings, SettingsError, load_settings

    try:
        if path is not None:
            overrides = {**overrides, **routed_bundle(path, overrides)}
        settings = load_settings(RouterSettings, **overrides)
        settings.fallback_key()  # fail at start, not at the first fallback
    except SettingsError as err:
        raise fail(str(err)) from None
    from services.core import logs
    from services.core.bundle import BundleError
    from services.core.program import ProgramFormatError
    from services.router.server import serve as run_router

    logs.configure(settings.log_level)

    def announce(port: int) -> None:
        print(f"edgedistill router listening on {settings.host}:{port}", flush=True)

    try:
        code = asyncio.run(run_router(settings, ready=announce))
    except (BundleError, ProgramFormatError, ValueError, OSError) as err:
        raise fail(f"cannot route: {err}", code=3) from None
    raise typer.Exit(code)
