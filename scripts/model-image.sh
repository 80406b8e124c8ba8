#!/usr/bin/env bash
# Build the model image of a bundle: scripts/model-image.sh BUNDLE_DIR TAG
# Env: CONTAINER_ENGINE (docker|podman), BASE_IMAGE (the services' base image).
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=${1:?usage: model-image.sh BUNDLE_DIR TAG}
tag=${2:?usage: model-image.sh BUNDLE_DIR TAG}
engine=${CONTAINER_ENGINE:-podman}
manifest=$bundle/manifest.json
[ -f "$manifest" ] || { echo "model-image: $manifest missing: is $bundle a bundle?" >&2; exit 2; }
field() { sed -n "s/^  \"$1\": \"\(.*\)\",\{0,1\}$/\1/p" "$manifest" | head -1; }
flags=(-q)
if [ "$engine" = podman ]; then flags+=(--pull=never --format docker); fi
"$engine" build "${flags[@]}" -f docker/model.Dockerfile \
  --build-arg BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim-bookworm}" \
  --build-arg BUNDLE_NAME="$(field name)" --build-arg BUNDLE_VERSION="$(field version)" \
  --build-arg MANIFEST_SHA256="$(sha256sum "$manifest" | cut -d' ' -f1)" \
  -t "$tag" "$bundle" >/dev/null
echo "$tag"
