"""Harvested records: what a router answered locally and what the API answered instead,
carried from the edge to the build host.

The router appends records as JSON lines to `DIR/harvest-*.jsonl` (services/router/harvest.py);
`edgedistill harvest export DIR OUT.tar` packs those files with a manifest of their checksums
(and an Ed25519 signature when given a key); the build reads them back with `read_harvest`,
which refuses a tar whose files do not match. Records hold request contents by design, never
credentials: the router writes only the fields below.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

FORMAT = "edgedistill-harvest/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"
RECORD_GLOB = "harvest-*.jsonl"


class HarvestError(Exception):
    """A harvest that cannot be trusted or read; the message says which file and why."""


class HarvestRecord(BaseModel):
    time: str  # ISO 8601, UTC
    kind: Literal["fallback", "sample"]  # sent to the API, or a sampled local answer
    bundle: str  # NAME@VERSION of the bundle the router served
    inputs: dict[str, str]
    local_outputs: dict[str, str] | None  # None when no runtime answered
    local_confidence: float | None
    local_outcome: str | None
    api_outputs: dict[str, str] | None  # the API's answer (fallbacks only)
    route_reason: str


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def pack(source: Path, out: Path, signing_key: Path | None = None) -> dict[str, Any]:
    """Pack the record files in `source` into the tar `out`; returns its manifest."""
    files = sorted(source.glob(RECORD_GLOB))
    if not files:
        raise HarvestError(f"{source}: no {RECORD_GLOB} files (is it the router's --harvest DIR?)")
    manifest = {
        "format": FORMAT,
        "created_at": now(),
        "records": sum(_count_lines(p) for p in files),
        "files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
    }
    body = json.dumps(manifest, indent=2).encode()
    partial = out.with_name(out.name + ".partial")
    with tarfile.open(partial, "w") as tar:
        _add_bytes(tar, MANIFEST, body)
        if signing_key is not None:
            _add_bytes(tar, SIGNATURE, _sign(body, signing_key))
        for path in files:
            tar.add(path, arcname=f"records/{path.name}")
    partial.replace(out)
    return manifest


def read_harvest(tar_path: Path, public_key: Path | None = None) -> list[HarvestRecord]:
    """Every record in a harvest tar, after its checksums (and signature) verify."""
    try:
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    except (OSError, tarfile.TarError) as err:
        raise HarvestError(f"{tar_path}: not a readable tar ({err})") from None
    if MANIFEST not in members:
        raise HarvestError(f"{tar_path}: no {MANIFEST}: not made by `edgedistill harvest export`")
    manifest = json.loads(members[MANIFEST])
    if manifest.get("format") != FORMAT:
        raise HarvestError(f"{tar_path}: format {manifest.get('format')!r}, expected {FORMAT}")
    if public_key is not None:
        _verify(members[MANIFEST], members.get(SIGNATURE), public_key, tar_path)
    listed = {f"records/{name}": digest for name, digest in manifest["files"].items()}
    present = {name for name in members if name.startswith("records/")}
    if present != set(listed):
        raise HarvestError(f"{tar_path}: its files differ from its manifest's list")
    records = []
    for name, digest in sorted(listed.items()):
        if hashlib.sha256(members[name]).hexdigest() != digest:
            raise HarvestError(f"{tar_path}: {name} does not match its checksum")
        records += _parse(members[name], f"{tar_path}:{name}")
    return records


def summary(records: list[HarvestRecord]) -> dict[str, Any]:
    times = sorted(r.time for r in records)
    return {
        "records": len(records),
        "kinds": dict(Counter(r.kind for r in records)),
        "route_reasons": dict(Counter(r.route_reason for r in records).most_common()),
        "bundles": dict(Counter(r.bundle for r in records)),
        "with_api_answer": sum(r.api_outputs is not None for r in records),
        "first": times[0] if times else None,
        "last": times[-1] if times else None,
    }


def _parse(data: bytes, where: str) -> list[HarvestRecord]:
    records = []
    for number, line in enumerate(data.decode().splitlines(), 1):
        try:
            records.append(HarvestRecord.model_validate_json(line))
        except ValidationError as err:
            raise HarvestError(f"{where} line {number}: not a harvest record ({err})") from None
    return records


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


def _sign(data: bytes, private_key_pem: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(private_key_pem.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise HarvestError(f"{private_key_pem}: not an Ed25519 private key")
    return key.sign(data)


def _verify(data: bytes, signature: bytes | None, public_key_pem: Path, where: Path) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if signature is None:
        raise HarvestError(f"{where}: a public key was given but the harvest is not signed")
    key = serialization.load_pem_public_key(public_key_pem.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise HarvestError(f"{public_key_pem}: not an Ed25519 public key")
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise HarvestError(f"{where}: the manifest's signature does not verify") from None
