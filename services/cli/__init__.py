"""The one CLI, `edgedistill`: one module per command group. Each command imports its service
lazily, so `predict` never loads llama.cpp and `serve` never loads torch."""

import importlib
import sys

if sys.argv[1:2] == ["serve"]:
    # llama.cpp's libraries before any other native library: a CUDA build of llama-cpp-python
    # segfaulted creating its context in a process that had loaded numpy and pydantic-core
    # first (seen on an H200; docs/building.md). A CPU build does not mind the order.
    import llama_cpp  # noqa: F401

from services.cli.common import app

# Importing a group registers its commands; `--help` lists them in this order.
COMMAND_GROUPS = ("serve", "route", "build", "keys", "client", "chat", "harvest")
for _group in COMMAND_GROUPS:
    importlib.import_module(f"services.cli.{_group}")

__all__ = ["app", "main"]


def main() -> None:
    app()
