#!/usr/bin/env bash
# `make build-bundle`: distill the spec into a model bundle, build the runtime and router
# images, and pack dist/<name>-<version>.tar for air-gapped hosts.
#
#   SPEC            build spec (default: the embedded ticket-triage example)
#   CONTAINER_ENGINE docker or podman (default: whichever is installed)
#   BUILDER         container (default with an engine on a GPU host) or venv (default otherwise)
#   BASE_IMAGE      Python 3.11 base for the runtime/router images (default python:3.11-slim-
#                   bookworm; built locally with debootstrap when no registry is reachable)
#   BUILDER_BASE_IMAGE  base for the builder image (default: a CUDA base on GPU hosts)
#   SIGNING_KEY     Ed25519 private key (PEM) to sign the manifest
#   MODEL_ONLY      1: the tar carries the bundle and the runtime and router image IDs, not the
#                   images (for hosts that installed a full tar of the same images before)
#   ADD_TRACES      harvest tars from edge routers (`edgedistill harvest export`), separated by
#                   spaces: their API answers become teacher traces (--add-traces)
#   TEACHER_MODEL, TEACHER_API_BASE, TEACHER_API_KEY_ENV  distill from an API model
set -euo pipefail
cd "$(dirname "$0")/.."

SPEC=${SPEC:-examples/ticket_triage/spec.yaml}
say() { printf '\033[1mbuild-bundle:\033[0m %s\n' "$*"; }

detect_engine() {
  if [ -n "${CONTAINER_ENGINE:-}" ]; then echo "$CONTAINER_ENGINE"; return; fi
  # A docker CLI without a reachable daemon is no engine: then try podman.
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then echo docker; return; fi
  if command -v podman >/dev/null 2>&1; then echo podman; return; fi
}
ENGINE=$(detect_engine)
export CONTAINER_ENGINE=$ENGINE
# podman builds offline only with --pull=never and keeps HEALTHCHECK only in docker format.
BUILD_FLAGS=(-q)
if [ "$ENGINE" = podman ]; then BUILD_FLAGS+=(--pull=never --format docker); fi
if [ "$ENGINE" = podman ] && [ -z "${CONTAINERS_CONF:-}" ] && [ -f docker/containers.conf ]; then
  export CONTAINERS_CONF=$PWD/docker/containers.conf
fi
# The builder container pays off on GPU hosts (CUDA base, --gpus); on CPU hosts the pipeline
# runs in .venv by default (BUILDER=container forces the image there too).
if [ -z "${BUILDER:-}" ]; then
  if [ -n "$ENGINE" ] && command -v nvidia-smi >/dev/null 2>&1; then BUILDER=container; else BUILDER=venv; fi
fi
if [ "$BUILDER" = container ] && [ -z "$ENGINE" ]; then
  echo "build-bundle: BUILDER=container needs docker or podman (install one, or set CONTAINER_ENGINE); BUILDER=venv runs the build without" >&2
  exit 2
fi
# The build folder, and the folders the spec reads (its own: the program module; the data's;
# the harvests' and key's), which the builder container mounts where they are on the host.
spec_facts=$(.venv/bin/python - "$SPEC" <<'PY'
import sys
from pathlib import Path
from services.builder.spec import SpecError, load_spec
try:
    spec = load_spec(Path(sys.argv[1]))
except SpecError as err:
    sys.exit(f"build-bundle: {err}")
files = [spec.data.train, spec.data.dev, spec.data.test, *spec.traces.added, spec.traces.public_key]
folders = {Path(sys.argv[1]).resolve().parent, *(Path(f).resolve().parent for f in files if f)}
print(spec.output)
print("\n".join(sorted(map(str, folders))))
PY
)
mapfile -t SPEC_FACTS <<<"$spec_facts"
OUTPUT=${SPEC_FACTS[0]}
spec_mounts=()
for folder in "${SPEC_FACTS[@]:1}"; do spec_mounts+=(-v "$folder:$folder:ro"); done
started=$(date +%s)

# Harvests, as the venv sees them and as the builder container sees them (mounted read-only).
venv_traces=(); container_traces=(); harvest_mounts=()
n=0
for tar in ${ADD_TRACES:-}; do
  if [ ! -f "$tar" ]; then
    echo "build-bundle: ADD_TRACES: $tar is not a file (give harvest tars from 'edgedistill harvest export')" >&2
    exit 2
  fi
  venv_traces+=(--add-traces "$tar")
  container_traces+=(--add-traces "/harvest/$n.tar")
  harvest_mounts+=(-v "$(realpath "$tar"):/harvest/$n.tar:ro")
  n=$((n + 1))
done

# 1. The model bundle.
if [ "$BUILDER" = container ]; then
  say "building the builder image ($ENGINE)"
  EXTRAS=builder scripts/wheelhouse.sh dist/wheelhouse >/dev/null
  builder_base=${BUILDER_BASE_IMAGE:-}
  if [ -z "$builder_base" ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      builder_base=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
    else
      builder_base=$(scripts/base-image.sh | sed -n 's/^base-image: \([^ ]*\).*/\1/p')
    fi
  fi
  "$ENGINE" build "${BUILD_FLAGS[@]}" -f docker/builder.Dockerfile \
    --build-arg BASE_IMAGE="$builder_base" -t localhost/edgedistill-builder:latest . >/dev/null
  gpu=()
  if command -v nvidia-smi >/dev/null 2>&1; then
    if [ "$ENGINE" = docker ]; then gpu=(--gpus all); else gpu=(--device nvidia.com/gpu=all); fi
  fi
  mkdir -p "$OUTPUT"
  say "running the build pipeline in the builder container"
  # The source tree is mounted read-only, and the spec's, its data's and its program's folders
  # where they are (a spec outside this tree too); the container runs as the calling user so
  # /out stays theirs.
  "$ENGINE" run --rm --init "${gpu[@]}" --user "$(id -u):$(id -g)" \
    -v "$PWD:/src:ro" -w /src -e PYTHONPATH=/src -v "$(realpath "$OUTPUT"):/out" \
    "${spec_mounts[@]}" ${harvest_mounts[@]+"${harvest_mounts[@]}"} \
    -e TEACHER_MODEL -e TEACHER_API_BASE -e TEACHER_API_KEY_ENV \
    ${TEACHER_API_KEY_ENV:+-e "$TEACHER_API_KEY_ENV"} \
    localhost/edgedistill-builder:latest "$(realpath "$SPEC")" --output /out \
    ${container_traces[@]+"${container_traces[@]}"}
else
  say "running the build pipeline in .venv"
  .venv/bin/edgedistill build "$SPEC" ${venv_traces[@]+"${venv_traces[@]}"}
fi
BUNDLE=$OUTPUT/bundle

# 2. The images (skipped, plainly, without an engine).
images=()
if [ -z "$ENGINE" ]; then
  say "no docker or podman found: the container images were SKIPPED."
  say "the model bundle is in $BUNDLE; install docker or podman (or set CONTAINER_ENGINE) and rerun 'make build-bundle' to add the images"
else
  # Packages the program's code imports beyond edgedistill's own go into both images.
  program_requires=$(.venv/bin/python -c 'import json, sys
print(" ".join(json.load(open(sys.argv[1])).get("requires", [])))' "$BUNDLE/program/program.json")
  if [ -n "$program_requires" ]; then say "the program's code also needs: $program_requires"; fi
  REQUIRES=$program_requires scripts/wheelhouse.sh dist/wheelhouse >/dev/null
  base=${BASE_IMAGE:-python:3.11-slim-bookworm}
  if ! "$ENGINE" image inspect "$base" >/dev/null 2>&1 && ! "$ENGINE" pull -q "$base" >/dev/null 2>&1; then
    say "$base cannot be pulled (no registry?): building a local Debian base with debootstrap"
    base=$(scripts/base-image.sh | sed -n 's/^base-image: \([^ ]*\).*/\1/p')
  fi
  version=$(sed -n 's/^  "version": "\(.*\)",$/\1/p' "$BUNDLE/manifest.json")
  mkdir -p dist/images
  tags=()
  for image in runtime router; do
    tag=localhost/edgedistill-$image:$version
    say "building $tag"
    "$ENGINE" build "${BUILD_FLAGS[@]}" -f docker/serve.Dockerfile --target "$image" \
      --build-arg BASE_IMAGE="$base" --build-arg PROGRAM_REQUIRES="$program_requires" \
      -t "$tag" . >/dev/null
    tags+=("$tag")
  done
  say "building localhost/edgedistill-model:$version (the bundle as an image, for registries)"
  tags+=("$(CONTAINER_ENGINE=$ENGINE BASE_IMAGE=$base scripts/model-image.sh "$BUNDLE" \
    "localhost/edgedistill-model:$version")")
  if [ "${MODEL_ONLY:-0}" = 1 ]; then
    # The same build inputs give the same image IDs: the site's images are these.
    images+=(--model-only)
    for image in runtime router; do
      images+=(--requires "$image=$("$ENGINE" image inspect --format '{{.Id}}' "localhost/edgedistill-$image:$version")")
    done
  else
    # One archive for the three images: their shared base and venv layers travel once.
    rm -f dist/images/images.tar
    if [ "$ENGINE" = podman ]; then
      podman save --multi-image-archive --format docker-archive -o dist/images/images.tar "${tags[@]}"
    else
      "$ENGINE" save -o dist/images/images.tar "${tags[@]}"
    fi
    images+=(--image "images=dist/images/images.tar")
  fi
fi

# 3. One verifiable file to carry.
shipped=$(.venv/bin/edgedistill ship "$BUNDLE" --out dist "${images[@]}" \
  ${SIGNING_KEY:+--signing-key "$SIGNING_KEY"})
say "done in $(( $(date +%s) - started )) s: $shipped ($(du -h "$shipped" | cut -f1))"
say "on the offline host: sh install.sh $(basename "$shipped")   (install.sh is inside the tar too)"
