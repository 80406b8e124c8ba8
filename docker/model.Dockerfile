# The model as an image: a bundle (GGUF, program, calibration, manifest) for registries, so a
# site's cluster pulls models like everything else. Build context: the bundle folder.
#   scripts/model-image.sh BUNDLE TAG
# It sits on the services' own base image, not scratch: those layers are already in the
# registry and in the shipped tar, so the model image costs only the bundle's bytes, and the
# Kubernetes init container has `cp` to copy the bundle into the runtime pod.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG BUNDLE_NAME=model
ARG BUNDLE_VERSION=0
ARG MANIFEST_SHA256=unknown
LABEL org.opencontainers.image.title="edgedistill model ${BUNDLE_NAME}" \
      org.opencontainers.image.version="${BUNDLE_VERSION}" \
      io.edgedistill.bundle.name="${BUNDLE_NAME}" \
      io.edgedistill.bundle.version="${BUNDLE_VERSION}" \
      io.edgedistill.bundle.manifest-sha256="${MANIFEST_SHA256}"
COPY . /bundle/
USER 10001
# The init container's job: copy the bundle into the pod's volume mounted at /copy.
CMD ["cp", "-R", "/bundle/.", "/copy/"]
