"""What every command shares: the app, error output, flags generated from settings."""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer
from pydantic_settings import BaseSettings
from rich.console import Console
from rich.markup import escape

from services.core.logs import console_width

app = typer.Typer(
    name="edgedistill",
    help="Distill a DSPy program into a small local model and serve it over gRPC.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True, width=console_width(sys.stderr))


def print_json(data: Any) -> None:
    """JSON on stdout as people read it: `日本語`, not `\\u65e5\\u672c\\u8a9e` (both are JSON)."""
    print(json.dumps(data, indent=2, ensure_ascii=False))


def fail(message: str, code: int = 2) -> typer.Exit:
    # One line whatever the width: a log or a script greps an error by its words.
    # escape: a message quoting a type (`list[str]`) is text, not rich markup.
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def settings_options(
    settings_cls: type[BaseSettings], path_help: str | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one --flag per setting, so flags and EDGEDISTILL_* never drift apart.

    The command receives the flags that were given as a dict in `overrides`; with `path_help`
    it also takes an optional positional PATH (`edgedistill serve build/bundle`), passed as
    `path`.
    """

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        params = []
        annotations: dict[str, Any] = {}
        if path_help is not None:
            argument = typer.Argument(None, help=path_help, metavar="PATH", show_default=False)
            params.append(
                inspect.Parameter("path", inspect.Parameter.KEYWORD_ONLY, default=argument)
            )
            annotations["path"] = Optional[str]  # noqa: UP045
        for name, field in settings_cls.model_fields.items():
            flag = "--" + name.replace("_", "-")
            annotation: Any = Optional[str]  # noqa: UP045 - typer needs Optional at runtime
            option = typer.Option(None, flag, help=field.description or name, show_default=False)
            if "list[" in str(field.annotation):
                annotation = Optional[list[str]]  # noqa: UP045
                option = typer.Option(None, flag, help=field.description or name)
            elif field.annotation is bool:
                annotation = Optional[bool]  # noqa: UP045
                option = typer.Option(
                    None, f"{flag}/--no-{flag[2:]}", help=field.description or name
                )
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option))
            annotations[name] = annotation

        def command(**kwargs: Any) -> Any:
            extra = {"path": kwargs.pop("path")} if path_help is not None else {}
            overrides = {k: (v or None) if isinstance(v, list) else v for k, v in kwargs.items()}
            return func(overrides=overrides, **extra)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = annotations
        command.__doc__ = func.__doc__
        command.__name__ = func.__name__
        return command

    return decorate


TargetOption = Annotated[str, typer.Option("--target", help="HOST:PORT of a runtime or router")]
TimeoutOption = Annotated[float, typer.Option("--timeout", help="deadline in seconds")]
