"""End to end with real containers (podman): build a base image offline, build the runtime and
router images from the host's wheelhouse, pack a bundle around the real SmolLM2 GGUF, install
it into a fresh podman storage as the offline host, call it over gRPC, and see a tampered or
truncated bundle refused. Cleans up after itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.core.api import pb
from services.core.client import InferenceClient
from tests.conftest import CAPITALS_PROGRAM
from tests.helpers import REPO, free_port

pytestmark = [
    pytest.mark.containers,
    pytest.mark.timeout(2400),
    pytest.mark.skipif(shutil.which("podman") is None, reason="needs podman (.ci/run installs it)"),
    pytest.mark.skipif(
        os.environ.get("EDGEDISTILL_E2E_CONTAINERS") != "1",
        reason="about 8 minutes of image builds: set EDGEDISTILL_E2E_CONTAINERS=1 (.ci/run does)",
    ),
]
CONF = {"CONTAINERS_CONF": str(REPO / "docker" / "containers.conf")}
BASE = "localhost/edgedistill-base:bookworm"


def sh(
    *args: str, env: dict[str, str] | None = None, check: bool = True, timeout: int = 900
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **CONF, **(env or {})},
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{args} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory, gguf_path: Path) -> Iterator[Path]:
    from services.builder.ship import ship
    from tests.test_runtime_server import make_bundle

    work = tmp_path_factory.mktemp("containers")
    sh("scripts/base-image.sh", BASE)
    sh("scripts/wheelhouse.sh", "dist/wheelhouse")
    tags = []
    for image in ("runtime", "router"):
        tag = f"localhost/edgedistill-{image}:e2e"
        sh("podman", "build", "--pull=never", "--format", "docker", "-q",
           "-f", f"docker/{image}.Dockerfile", "--build-arg", f"BASE_IMAGE={BASE}",
           "-t", tag, ".")  # fmt: skip
        tags.append(tag)
    archive = work / "images.tar"
    sh("podman", "save", "--multi-image-archive", "--format", "docker-archive",
       "-o", str(archive), *tags)  # fmt: skip
    bundle = make_bundle(work / "bundle", gguf_path, CAPITALS_PROGRAM)
    tar = ship(bundle_dir=bundle, images={"images": archive}, out_dir=work / "dist")
    for tag in tags:  # the build host keeps no test images
        sh("podman", "rmi", "-f", tag, check=False)
    archive.unlink()
    yield tar


@pytest.fixture()
def offline_host(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A fresh podman storage (no access to the build's images) and install prefix."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="edh-", dir="/tmp"))  # podman: runroot under 50 chars
    engine = f"podman --root {root}/storage --runroot {root}/run"
    env = {
        "CONTAINER_ENGINE": engine,
        "PREFIX": str(root / "opt"),
        "RUNTIME_PORT": str(free_port()),
        "ROUTER_PORT": str(free_port()),
        "RUNTIME_THREADS": "2",
    }
    yield env
    sh("sh", "scripts/install-bundle.sh", "--stop", "capitals", env=env, check=False)
    sh(*engine.split(), "system", "reset", "-f", check=False)
    shutil.rmtree(root, ignore_errors=True)


def install(
    tar: Path, env: dict[str, str], shipped: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the install.sh shipped inside the (good) bundle on `tar`."""
    with tarfile.open(shipped or tar) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("/install.sh"))
        script = tar.with_name("install.sh")
        script.write_bytes(archive.extractfile(member).read())  # type: ignore[union-attr]
    return sh("sh", str(script), str(tar), env=env, check=False, timeout=900)


def test_install_offline_serve_and_refuse_tampering(
    shipped: Path, offline_host: dict[str, str]
) -> None:
    installed = install(shipped, offline_host)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "checksums verified" in installed.stdout and "SERVING" in installed.stdout

    router = f"127.0.0.1:{offline_host['ROUTER_PORT']}"
    runtime = f"127.0.0.1:{offline_host['RUNTIME_PORT']}"
    with InferenceClient(router, timeout_s=120) as client:
        reply = client.predict({"country": "Germany"})
    assert reply.outcome == pb.PREDICT_OUTCOME_PARSED and reply.outputs["capital"]
    with InferenceClient(runtime, timeout_s=120) as client:
        chunks = list(client.generate([("user", "Say hello.")], max_tokens=8, temperature=0))
        info = client.info()
    assert chunks[-1].usage.completion_tokens > 0 and info.bundle_version == "2026.11.29-1"

    again = install(shipped, offline_host)
    assert again.returncode == 0 and "already installed" in again.stdout

    prefix = Path(offline_host["PREFIX"])
    before = sorted(str(p) for p in prefix.rglob("*"))
    tampered = shipped.with_name("tampered.tar")
    shutil.copy(shipped, tampered)
    with tarfile.open(shipped) as archive:
        gguf = next(m for m in archive.getmembers() if m.name.endswith(".gguf"))
    with tampered.open("r+b") as handle:  # flip one byte inside the GGUF's data
        handle.seek(gguf.offset_data + gguf.size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x01]))
    refused = install(tampered, offline_host, shipped)
    assert refused.returncode != 0
    assert "REFUSED" in refused.stderr and "checksum does not match" in refused.stderr

    truncated = shipped.with_name("truncated.tar")
    truncated.write_bytes(shipped.read_bytes()[: shipped.stat().st_size // 3])
    refused = install(truncated, offline_host, shipped)
    assert refused.returncode != 0 and "REFUSED" in refused.stderr
    assert sorted(str(p) for p in prefix.rglob("*")) == before  # the host is unchanged
