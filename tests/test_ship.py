"""The shippable tar and install.sh without containers: checksums, the Ed25519 signature,
refusals that leave the host unchanged, no-op reinstalls and rollback (START=0: files only)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from testkit.bundles import CAPITALS_PROGRAM
from testkit.processes import REPO


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.core.bundle import Manifest, write_manifest

    root = tmp_path_factory.mktemp("ship") / "bundle"
    (root / "model").mkdir(parents=True)
    (root / "program").mkdir()
    (root / "model" / "m.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 64)
    (root / "program" / "program.json").write_text(json.dumps(CAPITALS_PROGRAM))
    write_manifest(root, Manifest(name="capitals", version="1.0.0", default_model="model/m.gguf"))
    return root


def install(tar: Path, prefix: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(REPO / "scripts" / "install-bundle.sh"), str(tar)],
        capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "PREFIX": str(prefix), "START": "0", **env},
    )  # fmt: skip


def snapshot(prefix: Path) -> list[str]:
    return sorted(str(p) for p in prefix.rglob("*")) if prefix.exists() else []


def test_signed_bundle_installs_and_tampering_is_refused(bundle: Path, tmp_path: Path) -> None:
    from services.builder.ship import generate_keypair, ship

    generate_keypair(tmp_path / "key.pem", tmp_path / "key.pub")
    tar = ship(
        bundle_dir=bundle, images={}, out_dir=tmp_path / "dist", signing_key=tmp_path / "key.pem"
    )
    assert tar.name == "capitals-1.0.0.tar"
    with tarfile.open(tar) as archive:
        names = set(archive.getnames())
        files = {m.name.split("/", 1)[1] for m in archive.getmembers() if m.isfile()}
        raw = archive.extractfile("capitals-1.0.0/manifest.json")
        assert raw is not None
        manifest = json.loads(raw.read())
    assert {"capitals-1.0.0/install.sh", "capitals-1.0.0/compose.yaml",
            "capitals-1.0.0/manifest.json.sig",
            "capitals-1.0.0/bundle/model/m.gguf"} <= names  # fmt: skip
    assert set(manifest["files"]) == files - {"manifest.json", "manifest.json.sig"}

    prefix = tmp_path / "opt"
    done = install(tar, prefix, PUBLIC_KEY=str(tmp_path / "key.pub"))
    assert done.returncode == 0, done.stderr
    assert "signature verified" in done.stdout and "checksums verified" in done.stdout
    assert (prefix / "capitals" / "current" / "bundle" / "model" / "m.gguf").is_file()
    again = install(tar, prefix)
    assert again.returncode == 0 and "already installed" in again.stdout
    before = snapshot(prefix)

    # One flipped byte in the model.
    tampered = tmp_path / "tampered.tar"
    shutil.copy(tar, tampered)
    with tarfile.open(tar) as archive:
        member = archive.getmember("capitals-1.0.0/bundle/model/m.gguf")
    with tampered.open("r+b") as handle:
        handle.seek(member.offset_data + 100)
        value = handle.read(1)[0]
        handle.seek(member.offset_data + 100)
        handle.write(bytes([value ^ 1]))
    refused = install(tampered, prefix)
    assert refused.returncode == 1 and "checksum does not match" in refused.stderr

    # A manifest re-signed by someone else.
    generate_keypair(tmp_path / "other.pem", tmp_path / "other.pub")
    refused = install(tar, prefix, PUBLIC_KEY=str(tmp_path / "other.pub"))
    assert refused.returncode == 1 and "signature does not verify" in refused.stderr

    # Truncated in transit.
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    refused = install(truncated, prefix)
    assert refused.returncode == 1 and "REFUSED" in refused.stderr
    assert snapshot(prefix) == before  # nothing on the host changed


def test_new_version_replaces_and_rolls_back(bundle: Path, tmp_path: Path) -> None:
    from services.builder.ship import ship
    from services.core.bundle import Bundle, write_manifest

    first = ship(bundle_dir=bundle, images={}, out_dir=tmp_path / "dist")
    newer = tmp_path / "bundle2"
    shutil.copytree(bundle, newer)
    write_manifest(newer, Bundle.open(newer).manifest.model_copy(update={"version": "1.1.0"}))
    second = ship(bundle_dir=newer, images={}, out_dir=tmp_path / "dist")
    prefix = tmp_path / "opt"
    assert install(first, prefix).returncode == 0
    assert install(second, prefix).returncode == 0
    home = prefix / "capitals"
    assert (home / "current").resolve().name == "1.1.0"
    assert (home / "previous").resolve().name == "1.0.0"
    rolled = subprocess.run(
        ["sh", str(REPO / "scripts" / "install-bundle.sh"), "--rollback", "capitals"],
        capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "PREFIX": str(prefix), "START": "0"},
    )  # fmt: skip
    assert rolled.returncode == 0, rolled.stderr
    assert (home / "current").resolve().name == "1.0.0"
