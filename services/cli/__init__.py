"""The one CLI, `edgedistill`: one module per command group. Each command imports its service
lazily, so `predict` never loads llama.cpp and `serve` never loads torch."""

import importlib

from services.cli.common import app

# Importing a group registers its commands; `--help` lists them in this order.
COMMAND_GROUPS = ("serve", "route", "build", "keys", "client", "harvest")
for _group in COMMAND_GROUPS:
    importlib.import_module(f"services.cli.{_group}")

__all__ = ["app", "main"]


def main() -> None:
    app()
