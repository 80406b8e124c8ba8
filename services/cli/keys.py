"""`edgedistill keygen`: signing keys for bundles."""

from __future__ import annotations

from typing import Annotated

import typer

from services.cli.common import app


@app.command("keygen")
def keygen(
    private_key: Annotated[str, typer.Argument(help="where to write the private key (PEM)")],
    public_key: Annotated[str, typer.Argument(help="where to write the public key (PEM)")],
) -> None:
    """Make an Ed25519 key pair for signing bundles (SIGNING_KEY / PUBLIC_KEY)."""
    from pathlib import Path

    from services.builder.ship import generate_keypair

    generate_keypair(Path(private_key), Path(public_key))
