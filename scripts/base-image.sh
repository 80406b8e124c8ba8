#!/usr/bin/env bash
# A minimal Debian 12 + Python 3.11 base image built locally with debootstrap, for hosts that
# reach no registry: scripts/base-image.sh localhost/edgedistill-base:bookworm
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-localhost/edgedistill-base:bookworm}
ENGINE=${CONTAINER_ENGINE:-podman}
MIRROR=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
if "$ENGINE" image inspect "$TAG" >/dev/null 2>&1; then
  echo "base-image: $TAG exists"; exit 0
fi
command -v debootstrap >/dev/null || { echo "base-image: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
ROOTFS=$(mktemp -d)
trap 'rm -rf "$ROOTFS"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$ROOTFS" "$MIRROR" >/dev/null
cp -r /etc/apt/sources.list.d "$ROOTFS/etc/apt/" 2>/dev/null || true
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | "$ENGINE" import - "$TAG" >/dev/null
echo "base-image: $TAG"
