"""`edgedistill harvest export|inspect`: carry the router's harvest to the build host."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from services.cli.common import app, fail, print_json

harvest_app = typer.Typer(
    help="Pack the router's --harvest records for the build host, or summarise a pack.",
    no_args_is_help=True,
)
app.add_typer(harvest_app, name="harvest")


@harvest_app.command("export")
def export(
    folder: Annotated[Path, typer.Argument(help="the router's --harvest folder")],
    out: Annotated[Path, typer.Argument(help="the tar to write, e.g. harvest.tar")],
    signing_key: Annotated[
        Optional[Path],  # noqa: UP045 - typer needs Optional at runtime
        typer.Option(help="Ed25519 private key (PEM) to sign the manifest"),
    ] = None,
) -> None:
    """Pack the records with a manifest of checksums (signed when given a key)."""
    from services.core.harvest import HarvestError, pack

    if not folder.is_dir():
        raise fail(f"{folder} is not a folder: give the router's --harvest DIR")
    try:
        manifest = pack(folder, out, signing_key)
    except HarvestError as err:
        raise fail(str(err)) from None
    except ImportError:
        raise fail("signing needs the cryptography package: pip install cryptography") from None
    print(f"{out}: {manifest['records']} records in {len(manifest['files'])} files")


@harvest_app.command("inspect")
def inspect_pack(
    pack_path: Annotated[Path, typer.Argument(help="a tar from `edgedistill harvest export`")],
    public_key: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Ed25519 public key (PEM) the manifest must be signed with"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Verify a harvest pack and summarise it: records by kind and route reason, time span."""
    from services.core.harvest import HarvestError, read_harvest, summary

    try:
        facts = summary(read_harvest(pack_path, public_key))
    except HarvestError as err:
        raise fail(str(err)) from None
    if as_json:
        print_json(facts)
        return
    table = Table(title=f"{pack_path}: checksums verified", show_header=False)
    table.add_row("records", str(facts["records"]))
    table.add_row("with an API answer", str(facts["with_api_answer"]))
    table.add_row("kinds", ", ".join(f"{k} {n}" for k, n in facts["kinds"].items()))
    table.add_row("route reasons", ", ".join(f"{k} {n}" for k, n in facts["route_reasons"].items()))
    table.add_row("bundles", ", ".join(f"{k} {n}" for k, n in facts["bundles"].items()))
    table.add_row("from", str(facts["first"]))
    table.add_row("to", str(facts["last"]))
    Console().print(table)
