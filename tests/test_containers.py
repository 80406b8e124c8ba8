"""End to end with real containers (podman): build a base image offline, build the runtime and
router images from the host's wheelhouse, pack a bundle around the real SmolLM2 GGUF, install
it into a fresh podman storage as the offline host, call it over gRPC, and see a tampered or
truncated bundle refused. A planted API key and token, present on the build host and given to
the installed services, are then looked for in every image layer, the bundle, the services'
logs and their metrics. Cleans up after itself."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import grpc
import pytest

from services.core.api import pb
from services.core.client import InferenceClient
from testkit.bundles import CAPITALS_PROGRAM
from testkit.processes import REPO, free_port, wait_http

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
PLANTED_KEY = "sk-planted-e2e-7d1f00d-never-ship-me"
PLANTED_TOKEN = "tok-planted-e2e-5ca1ab1e"
# Where a build host keeps secrets by habit: the compose secret's default source, a .env.
PLANTED_FILES = (REPO / "docker" / "fallback_api_key", REPO / ".env")


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
    from testkit.bundles import make_bundle

    work = tmp_path_factory.mktemp("containers")
    # The build host has the secrets at hand (as a user who also runs the router would): in
    # its environment and in files in the checkout. None of it may reach an image or a bundle.
    for planted in PLANTED_FILES:
        assert not planted.exists(), f"{planted} exists; the test will not overwrite it"
    secrets_env = {
        "OPENAI_API_KEY": PLANTED_KEY,
        "EDGEDISTILL_ROUTER_FALLBACK_API_KEY": PLANTED_KEY,
        "EDGEDISTILL_AUTH_TOKEN": PLANTED_TOKEN,
    }
    try:
        PLANTED_FILES[0].write_text(PLANTED_KEY + "\n")
        PLANTED_FILES[1].write_text(f"OPENAI_API_KEY={PLANTED_KEY}\nTOKEN={PLANTED_TOKEN}\n")
        sh("scripts/base-image.sh", BASE)
        # As build-bundle passes a program.json's `requires`: a package its code imports.
        extra = f"safetensors=={metadata.version('safetensors')}"
        sh("scripts/wheelhouse.sh", "dist/wheelhouse", env={**secrets_env, "REQUIRES": extra})
        tags = []
        for image in ("runtime", "router"):
            tag = f"localhost/edgedistill-{image}:e2e"
            sh("podman", "build", "--pull=never", "--format", "docker", "-q",
               "-f", "docker/serve.Dockerfile", "--target", image,
               "--build-arg", f"BASE_IMAGE={BASE}", "--build-arg", f"PROGRAM_REQUIRES={extra}",
               "-t", tag, ".", env=secrets_env)  # fmt: skip
            tags.append(tag)
        imported = sh("podman", "run", "--rm", "--entrypoint", "python", tags[0], "-c",
                      "import safetensors; print(safetensors.__version__)")  # fmt: skip
        assert imported.stdout.strip() == extra.partition("==")[2]
    finally:
        for planted in PLANTED_FILES:
            planted.unlink(missing_ok=True)
    # A threshold no answer reaches: every Predict tries the (unreachable) API with the key.
    bundle = make_bundle(work / "bundle", gguf_path, CAPITALS_PROGRAM, threshold=0.999)
    tags.append(model_image(bundle, "localhost/edgedistill-model:e2e"))
    archive = work / "images.tar"
    sh("podman", "save", "--multi-image-archive", "--format", "docker-archive",
       "-o", str(archive), *tags)  # fmt: skip
    tar = ship(bundle_dir=bundle, images={"images": archive}, out_dir=work / "dist")
    for tag in tags:  # the build host keeps no test images
        sh("podman", "rmi", "-f", tag, check=False)
    archive.unlink()
    yield tar
    shutil.rmtree(work, ignore_errors=True)  # the shipped tar is as large as the images


def model_image(bundle: Path, tag: str) -> str:
    env = {"CONTAINER_ENGINE": "podman", "BASE_IMAGE": BASE}
    return sh("scripts/model-image.sh", str(bundle), tag, env=env).stdout.strip()


def test_the_model_image_carries_the_bundle_for_an_init_container(
    shipped: Path, gguf_path: Path, tmp_path: Path
) -> None:
    """As the Kubernetes init container runs it: unprivileged, read-only, no network, copying
    into the pod's volume; the copy verifies against its manifest; labels name the bundle."""
    from services.core.bundle import Bundle, sha256_file
    from testkit.bundles import make_bundle

    bundle = make_bundle(tmp_path / "bundle", gguf_path, CAPITALS_PROGRAM)
    tag = model_image(bundle, "localhost/edgedistill-model:test")
    try:
        labels = json.loads(sh("podman", "image", "inspect", "--format", "{{json .Labels}}",
                               tag).stdout)  # fmt: skip
        manifest = Bundle.open(bundle).manifest
        assert labels["io.edgedistill.bundle.version"] == manifest.version
        assert labels["io.edgedistill.bundle.manifest-sha256"] == sha256_file(
            bundle / "manifest.json"
        )
        copy = tmp_path / "copy"
        copy.mkdir(mode=0o777)
        copy.chmod(0o777)
        sh("podman", "run", "--rm", "--read-only", "--cap-drop=ALL", "--network=none",
           "--user", "10001:10001", "-v", f"{copy}:/copy", tag)  # fmt: skip
        assert Bundle.open(copy).manifest.version == manifest.version  # every file verified
    finally:
        sh("podman", "rmi", "-f", tag, check=False)


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
        "HTTP_PORT": str(free_port()),
        "RUNTIME_THREADS": "2",
    }
    secrets = root / "secrets"
    secrets.mkdir(mode=0o700)
    for name, value in (("fallback_api_key", PLANTED_KEY), ("auth_token", PLANTED_TOKEN)):
        (secrets / name).write_text(value + "\n")
        (secrets / name).chmod(0o644)  # the services' uid reads it; the folder keeps others out
    env |= {
        "ROUTER_MODE": "hybrid",
        "FALLBACK_MODEL": "openai/teacher",
        "FALLBACK_API_BASE": "http://127.0.0.1:9/v1",  # nothing listens: the API is down
        "FALLBACK_KEY_FILE": str(secrets / "fallback_api_key"),
        "AUTH_TOKEN_FILE": str(secrets / "auth_token"),
    }
    yield env
    sh("sh", "scripts/install-bundle.sh", "--stop", "capitals", env=env, check=False)
    sh(*engine.split(), "system", "reset", "-f", check=False)
    shutil.rmtree(root, ignore_errors=True)


def install(
    tar: Path, env: dict[str, str], shipped: Path | None = None, *options: str
) -> subprocess.CompletedProcess[str]:
    """Run the install.sh shipped inside the (good) bundle on `tar`."""
    with tarfile.open(shipped or tar) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("/install.sh"))
        script = tar.with_name("install.sh")
        script.write_bytes(archive.extractfile(member).read())  # type: ignore[union-attr]
    return sh("sh", str(script), *options, str(tar), env=env, check=False, timeout=900)


def test_install_offline_serve_and_refuse_tampering(
    shipped: Path, offline_host: dict[str, str]
) -> None:
    installed = install(shipped, offline_host)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "checksums verified" in installed.stdout and "SERVING" in installed.stdout

    router = f"127.0.0.1:{offline_host['ROUTER_PORT']}"
    runtime = f"127.0.0.1:{offline_host['RUNTIME_PORT']}"
    with InferenceClient(router, timeout_s=120, token=PLANTED_TOKEN) as client:
        reply = client.predict({"country": "Germany"})
    assert reply.outcome == pb.PREDICT_OUTCOME_PARSED and reply.outputs["capital"]
    # The API is down: the local answer comes back, flagged, after the router used the key.
    assert reply.served_by == pb.SERVED_BY_LOCAL and reply.degraded and reply.route_reason
    with InferenceClient(runtime, timeout_s=120, token=PLANTED_TOKEN) as client:
        chunks = list(client.generate([("user", "Say hello.")], max_tokens=8, temperature=0))
        info = client.info()
    assert chunks[-1].usage.completion_tokens > 0 and info.bundle_version == "2026.11.29-1"
    for target in (router, runtime):
        with InferenceClient(target, timeout_s=30) as client, pytest.raises(grpc.RpcError) as no:
            client.info()
        assert no.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert_the_routers_http_api_answers(offline_host["HTTP_PORT"])

    scan_for_planted_secrets(shipped, offline_host)
    release = Path(offline_host["PREFIX"]) / "capitals" / "current"
    assert (release / "images" / "model.ref").read_text().startswith("localhost/edgedistill-model")

    again = install(shipped, offline_host)
    assert again.returncode == 0 and "already installed" in again.stdout

    serve_with_compose(offline_host)

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


def assert_the_routers_http_api_answers(port: str) -> None:
    """HTTP_PORT publishes the router container's HTTP API, with the same token."""
    url = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(f"{url}/health", timeout=30) as health:
        assert json.load(health) == {"status": "ok"}
    body = json.dumps({"inputs": {"country": "Germany"}}).encode()
    bearer = {"Authorization": f"Bearer {PLANTED_TOKEN}"}
    asked = urllib.request.Request(f"{url}/v1/predict", data=body, headers=bearer)
    with urllib.request.urlopen(asked, timeout=120) as answer:
        assert json.load(answer)["outputs_json"]["capital"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(f"{url}/v1/predict", data=body), timeout=30)
    assert refused.value.code == 401
    with urllib.request.urlopen(urllib.request.Request(f"{url}/api/tags", headers=bearer),
                                timeout=30) as listed:  # fmt: skip
        assert json.load(listed)["models"][0]["name"] == "capitals:latest"  # Ollama's API too


def test_install_skips_a_docker_without_daemon_and_a_failed_start_installs_nothing(
    shipped: Path, offline_host: dict[str, str], tmp_path: Path
) -> None:
    """A docker CLI whose daemon does not answer is passed over for podman; a start that fails
    (here: the runtime's port is taken) leaves no release current and says what failed; once
    the cause is gone, running install.sh again installs and starts it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(
        "#!/bin/sh\necho 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock.'"
        " >&2\nexit 1\n"
    )
    # podman as found on PATH, on this offline host's own storage.
    storage = offline_host["CONTAINER_ENGINE"].split()[1:]
    (bin_dir / "podman").write_text(
        f'#!/bin/sh\nexec {shutil.which("podman")} {" ".join(storage)} "$@"\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {k: v for k, v in offline_host.items() if k != "CONTAINER_ENGINE"}
    env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    home = Path(offline_host["PREFIX"]) / "capitals"

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(offline_host["RUNTIME_PORT"])))
        taken.listen()
        failed = install(shipped, env)
    assert failed.returncode != 0, failed.stdout
    assert "Cannot connect" not in failed.stdout + failed.stderr  # docker was never used
    assert "checksums verified" in failed.stdout  # podman loaded the images
    assert "capitals 2026.11.29-1 did not start" in failed.stderr
    assert "the runtime container did not start" in failed.stderr
    assert "address already in use" in failed.stderr
    assert not (home / "current").exists() and not list((home / "releases").iterdir())
    assert sh(str(bin_dir / "podman"), "ps", "-a", "--format", "{{.Names}}").stdout.split() == []

    again = install(shipped, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already installed" not in again.stdout and "SERVING" in again.stdout
    assert (home / "current").resolve() == home / "releases" / "2026.11.29-1"

    # A newer release whose runtime refuses its model: the one that was current is current and
    # serving again, and the newer one is not installed.
    upgrade = install(damaged_release(shipped, tmp_path / "upgrade", "2026.12.02-2"), env, shipped)
    assert upgrade.returncode != 0, upgrade.stdout
    assert "capitals 2026.12.02-2 did not start" in upgrade.stderr
    assert "the runtime exited at start" in upgrade.stderr
    assert "2026.11.29-1 is current and running again" in upgrade.stdout
    assert (home / "current").resolve() == home / "releases" / "2026.11.29-1"
    assert not (home / "releases" / "2026.12.02-2").exists()
    runtime = f"127.0.0.1:{offline_host['RUNTIME_PORT']}"
    with InferenceClient(runtime, timeout_s=60, token=PLANTED_TOKEN) as client:
        assert client.info().bundle_version == "2026.11.29-1"


def damaged_release(shipped: Path, work: Path, version: str) -> Path:
    """The shipped tar as another version whose GGUF is truncated: every checksum of the outer
    manifest matches (install.sh accepts it), the bundle's own manifest does not (the runtime
    refuses to start)."""
    from services.builder.ship import write_manifest_lines

    with tarfile.open(shipped) as archive:
        archive.extractall(work, filter="data")
    top = next(work.iterdir())
    gguf = next((top / "bundle" / "model").glob("*.gguf"))
    gguf.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    (top / "manifest.json").unlink()
    write_manifest_lines(top, "capitals", version)
    tar = work.with_suffix(".tar")
    with tarfile.open(tar, "w") as archive:
        archive.add(top, arcname=f"capitals-{version}")
    return tar


def serve_with_compose(host: dict[str, str]) -> None:
    """The installed release's compose.yaml, run by podman-compose (its .env names the loaded
    images and the bundle), serves the same pair, hardened, with the token as a secret."""
    sh("sh", "scripts/install-bundle.sh", "--stop", "capitals", env=host)
    engine = host["CONTAINER_ENGINE"].split()
    compose = [
        str(Path(sys.executable).parent / "podman-compose"),
        "--podman-args", " ".join(engine[1:]),  # the offline host's own storage
        "-f", str(Path(host["PREFIX"]) / "capitals" / "current" / "compose.yaml"),
    ]  # fmt: skip
    env = {
        "RUNTIME_PORT": host["RUNTIME_PORT"], "ROUTER_PORT": host["ROUTER_PORT"],
        "HTTP_PORT": host["HTTP_PORT"], "ROUTER_MODE": "local_only",
        "AUTH_TOKEN_SOURCE": host["AUTH_TOKEN_FILE"],
        "AUTH_TOKEN_FILE": "/run/secrets/auth_token",
        "ROUTER_AUTH_TOKEN_FILE": "/run/secrets/auth_token",
    }  # fmt: skip
    sh(*compose, "up", "-d", env=env)
    try:
        names = sh(*engine, "ps", "--format", "{{.Names}}").stdout.split()
        assert len(names) == 2 and all(n.startswith("edgedistill") for n in names), names
        for name in names:
            hardening = sh(*engine, "inspect", name, "--format",
                           "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}} {{.EffectiveCaps}} "
                           "{{.HostConfig.SecurityOpt}}").stdout.strip()  # fmt: skip
            assert hardening == "10001 true [] [no-new-privileges]", hardening
        router = f"127.0.0.1:{host['ROUTER_PORT']}"
        deadline = time.monotonic() + 180  # podman < 4.6 starts the router without waiting
        while True:
            try:
                with InferenceClient(router, timeout_s=60, token=PLANTED_TOKEN) as client:
                    reply = client.predict({"country": "France"})
                break
            except grpc.RpcError as err:
                if time.monotonic() > deadline:
                    logs = [sh(*engine, "logs", n, check=False).stderr[-1500:] for n in names]
                    raise AssertionError(f"compose never answered: {err}\n{logs}") from err
                time.sleep(2)
        assert reply.outcome == pb.PREDICT_OUTCOME_PARSED and reply.outputs["capital"]
        assert reply.served_by == pb.SERVED_BY_LOCAL
        with InferenceClient(router, timeout_s=30) as client, pytest.raises(grpc.RpcError) as no:
            client.info()
        assert no.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert_the_routers_http_api_answers(host["HTTP_PORT"])
    finally:
        sh(*compose, "down", env=env, check=False)


def scan_for_planted_secrets(shipped: Path, host: dict[str, str]) -> None:
    """Neither planted secret in an image layer, the bundle, a log line or a metric."""
    engine = host["CONTAINER_ENGINE"].split()
    prefix = Path(host["PREFIX"])
    release = next((prefix / "capitals" / "releases").iterdir())
    places: dict[str, bytes] = {"the shipped bundle tar": shipped.read_bytes()}
    for file in prefix.rglob("*"):
        if file.is_file() and not file.is_symlink():
            places[f"installed {file.relative_to(prefix)}"] = file.read_bytes()
    for image in ("runtime", "router"):
        ref = (release / "images" / f"{image}.ref").read_text().strip()
        saved = prefix.parent / f"{image}-saved.tar"
        # docker-archive layers are plain tars: a secret in any layer is in these bytes.
        sh(*engine, "save", "--format", "docker-archive", "-o", str(saved), ref)
        places[f"{image} image layers"] = saved.read_bytes()
        saved.unlink()
        container = f"capitals-{image}"
        logs = sh(*engine, "logs", container)
        places[f"{image} logs"] = (logs.stdout + logs.stderr).encode()
        port = 9465 if image == "router" else 9464
        scrape = sh(*engine, "exec", container, "python3", "-c",
                    f"import urllib.request; print(urllib.request.urlopen("
                    f"'http://127.0.0.1:{port}/metrics', timeout=5).read().decode())")  # fmt: skip
        assert "edgedistill" in scrape.stdout, scrape.stdout[:500]
        places[f"{image} metrics"] = scrape.stdout.encode()
    assert b"fallback" in places["router logs"], "the router never logged its fallback attempts"
    for place, content in places.items():
        for secret in (PLANTED_KEY, PLANTED_TOKEN):
            assert secret.encode() not in content, f"{secret} found in {place}"


@pytest.fixture()
def registry(tmp_path: Path) -> Iterator[str]:
    """The open-source distribution registry (Debian's docker-registry) on loopback."""
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.skip("needs Debian's docker-registry (.ci/run installs it)")
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path / 'storage'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/", proc, "the registry", timeout=30)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def registry_digest(registry: str, repository: str, tag: str) -> str:
    request = urllib.request.Request(
        f"http://{registry}/v2/{repository}/manifests/{tag}",
        method="HEAD",
        headers={"Accept": ", ".join([
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.oci.image.manifest.v1+json",
        ])},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as reply:
        return str(reply.headers["Docker-Content-Digest"])


def test_install_pushes_to_the_site_registry_and_pins_the_overlay_by_digest(
    shipped: Path, offline_host: dict[str, str], registry: str
) -> None:
    import kubernetes_validate
    import yaml

    env = {**offline_host, "REGISTRY_TLS_VERIFY": "0", "KUBE_NAMESPACE": "edge"}
    pushed = install(shipped, env, None, "--registry", f"{registry}/edge")
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert "checksums verified" in pushed.stdout and "SERVING" not in pushed.stdout
    engine = offline_host["CONTAINER_ENGINE"].split()
    assert sh(*engine, "ps", "-q").stdout.strip() == ""  # nothing started

    site = Path(offline_host["PREFIX"]) / "capitals" / "current" / "kubernetes" / "site"
    out = sh("kubectl", "kustomize", str(site)).stdout
    objects = [doc for doc in yaml.safe_load_all(out) if doc]
    images = {}
    for obj in objects:
        if obj["kind"] == "Deployment":
            assert obj["metadata"]["namespace"] == "edge"
            spec = obj["spec"]["template"]["spec"]
            for container in spec["containers"] + spec["initContainers"]:
                images[container["image"].split("@")[0]] = container["image"].split("@")[1]
        kubernetes_validate.validate(obj, "1.29.0", strict=True)
    for image in ("runtime", "router", "model"):
        repository = f"edge/edgedistill-{image}"
        digest = registry_digest(registry, repository, "2026.11.29-1")
        assert images[f"{registry}/{repository}"] == digest  # pinned to what the registry holds


def test_a_model_only_release_installs_where_its_images_are_and_rolls_back(
    shipped: Path, offline_host: dict[str, str], gguf_path: Path, tmp_path: Path
) -> None:
    """A retrained model ships without the images: it installs as a new release on a host
    holding the images (checked by ID), is refused elsewhere with what to ship instead, and
    rollback returns to the full release."""
    from services.builder.ship import ship
    from testkit.bundles import make_bundle

    full = install(shipped, {**offline_host, "START": "0"})
    assert full.returncode == 0, full.stdout + full.stderr
    engine = offline_host["CONTAINER_ENGINE"].split()
    release = Path(offline_host["PREFIX"]) / "capitals" / "current"
    ids = {image: sh(*engine, "image", "inspect", "--format", "{{.Id}}",
                     (release / "images" / f"{image}.ref").read_text().strip()).stdout.strip()
           for image in ("runtime", "router")}  # fmt: skip
    bundle = make_bundle(tmp_path / "bundle", gguf_path, CAPITALS_PROGRAM, threshold=0.999,
                         version="2026.11.29-2")  # fmt: skip
    model_only = ship(bundle_dir=bundle, images={}, out_dir=tmp_path / "dist", requires=ids)
    assert model_only.stat().st_size < shipped.stat().st_size / 3  # no images inside

    missing = ship(bundle_dir=make_bundle(tmp_path / "b3", gguf_path, CAPITALS_PROGRAM,
                                          version="2026.11.29-3"),
                   images={}, out_dir=tmp_path / "dist3",
                   requires={**ids, "runtime": "f" * 64})  # fmt: skip
    prefix = Path(offline_host["PREFIX"])
    before = sorted(str(p) for p in prefix.rglob("*"))
    refused = install(missing, offline_host, shipped)
    assert refused.returncode != 0 and "does not hold" in refused.stderr
    assert "install the full tar" in refused.stderr
    assert sorted(str(p) for p in prefix.rglob("*")) == before

    installed = install(model_only, offline_host, shipped)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "model-only release" in installed.stdout and "SERVING" in installed.stdout
    runtime = f"127.0.0.1:{offline_host['RUNTIME_PORT']}"
    with InferenceClient(runtime, timeout_s=120, token=PLANTED_TOKEN) as client:
        assert client.info().bundle_version == "2026.11.29-2"

    script = model_only.with_name("install.sh")
    back = sh("sh", str(script), "--rollback", "capitals", env=offline_host, check=False,
              timeout=900)  # fmt: skip
    assert back.returncode == 0, back.stdout + back.stderr
    with InferenceClient(runtime, timeout_s=120, token=PLANTED_TOKEN) as client:
        assert client.info().bundle_version == "2026.11.29-1"
