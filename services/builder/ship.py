"""The shippable file: dist/<name>-<version>.tar for air-gapped hosts.

    <name>-<version>/
      manifest.json        name, version, and "files": {member: sha256} for every other member
      manifest.json.sig    Ed25519 signature of manifest.json (when a signing key is given)
      install.sh           scripts/install-bundle.sh: POSIX sh + tar + sha256sum + docker/podman
      compose.yaml         runtime + router
      kubernetes/...       deploy/kubernetes + site/resources.yaml (memory from the bundle's peak)
      bundle/...           the model bundle (GGUF, program, calibration, report)
      images/images.tar    runtime, router and model images in one docker-archive (shared
                           layers once); or, in a model-only tar,
      images/requires      "NAME IMAGE_ID" per line: the images the host must already hold

manifest.json is written one file per line so that install.sh can check it with sed and
sha256sum alone, without Python or jq.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from services.builder.host_cache import link_or_copy
from services.builder.kube import write_manifests
from services.core.bundle import Bundle, sha256_file

REPO = Path(__file__).resolve().parents[2]


def write_manifest_lines(root: Path, name: str, version: str) -> Path:
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in ("manifest.json", "manifest.json.sig"):
            continue
        files[rel] = sha256_file(path)
    lines = [
        "{",
        '  "format": "edgedistill-ship/1",',
        f'  "name": {json.dumps(name)},',
        f'  "version": {json.dumps(version)},',
        f'  "created_at": {json.dumps(datetime.now(UTC).isoformat())},',
        '  "files": {',
    ]
    entries = [f'    {json.dumps(rel)}: "{digest}"' for rel, digest in files.items()]
    lines.append(",\n".join(entries))
    lines += ["  }", "}"]
    manifest = root / "manifest.json"
    manifest.write_text("\n".join(lines) + "\n")
    json.loads(manifest.read_text())  # still valid JSON for every other reader
    return manifest


def sign(manifest: Path, private_key_pem: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(private_key_pem.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{private_key_pem}: not an Ed25519 private key")
    signature = manifest.with_name("manifest.json.sig")
    signature.write_bytes(key.sign(manifest.read_bytes()))
    return signature


def generate_keypair(private_path: Path, public_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    private_path.chmod(0o600)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def ship(
    *,
    bundle_dir: Path,
    images: dict[str, Path],
    out_dir: Path,
    signing_key: Path | None = None,
    requires: dict[str, str] | None = None,
) -> Path:
    """Pack the bundle (and image archives) into out_dir/<name>-<version>.tar, atomically.
    `requires` (image name -> image ID) makes a model-only tar: no images, only the IDs of
    those the host must already hold."""
    if requires and images:
        raise ValueError("a model-only tar carries image IDs, not images: give one or the other")
    bundle = Bundle.open(bundle_dir)  # refuse to ship a bundle that does not verify
    name, version = bundle.manifest.name, bundle.manifest.version
    top = f"{name}-{version}"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".ship-") as tmp:
        root = Path(tmp) / top
        root.mkdir()
        shutil.copytree(bundle_dir, root / "bundle", copy_function=link_or_copy)
        if images:
            (root / "images").mkdir()
            for image_name, archive in images.items():
                link_or_copy(str(archive), str(root / "images" / f"{image_name}.tar"))
        if requires:
            (root / "images").mkdir()
            (root / "images" / "requires").write_text(
                "".join(f"{name} {image_id.removeprefix('sha256:')}\n"
                        for name, image_id in sorted(requires.items()))
            )  # fmt: skip
        shutil.copy2(REPO / "scripts" / "install-bundle.sh", root / "install.sh")
        shutil.copy2(REPO / "docker" / "compose.yaml", root / "compose.yaml")
        write_manifests(bundle_dir, root / "kubernetes")
        manifest = write_manifest_lines(root, name, version)
        if signing_key is not None:
            sign(manifest, signing_key)
        partial = out_dir / f".{top}.tar.partial"
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(root, arcname=top)
        final = out_dir / f"{top}.tar"
        os.replace(partial, final)
    return final
