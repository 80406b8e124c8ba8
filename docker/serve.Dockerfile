# The serving images, one per target: `runtime` (gRPC inference over a bundle's GGUF, llama.cpp
# in-process) and `router` (local first, API fallback; its key comes from a secret at run time,
# never from the image or the bundle). No torch. Built offline from the host's wheelhouse
# (scripts/wheelhouse.sh); the two share every layer but their settings:
#   podman build -f docker/serve.Dockerfile --target runtime --build-arg BASE_IMAGE=... .
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS install
# Packages the bundle's program code imports beyond edgedistill's own (its program.json's
# `requires`, pinned), e.g. "rapidfuzz==3.9.0"; empty for most programs.
ARG PROGRAM_REQUIRES=""
COPY dist/wheelhouse /wheels
# --no-index: every package comes from the wheelhouse; nothing is fetched during the build.
# PROGRAM_REQUIRES is a list of requirements: split on spaces.
# hadolint ignore=SC2086
RUN python3 -m venv /opt/edgedistill \
 && /opt/edgedistill/bin/pip install --no-cache-dir --no-index --find-links /wheels edgedistill \
    $PROGRAM_REQUIRES \
 && find /opt/edgedistill -name '__pycache__' -prune -exec rm -rf {} + \
 && /opt/edgedistill/bin/python -m compileall -q /opt/edgedistill/lib

FROM ${BASE_IMAGE} AS serving
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin edgedistill
COPY --from=install /opt/edgedistill /opt/edgedistill
ENV PATH=/opt/edgedistill/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    DSPY_CACHEDIR=/tmp/dspy-cache
USER 10001

FROM serving AS runtime
ENV EDGEDISTILL_HOST=0.0.0.0 \
    EDGEDISTILL_PORT=50051 \
    EDGEDISTILL_METRICS_PORT=9464 \
    EDGEDISTILL_BUNDLE=/bundle
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=4s --start-period=60s --retries=3 \
  CMD ["edgedistill", "health", "--target", "127.0.0.1:50051"]
ENTRYPOINT ["edgedistill", "serve"]

FROM serving AS router
ENV EDGEDISTILL_ROUTER_HOST=0.0.0.0 \
    EDGEDISTILL_ROUTER_PORT=50052 \
    EDGEDISTILL_ROUTER_METRICS_PORT=9465 \
    EDGEDISTILL_ROUTER_BUNDLE=/bundle
EXPOSE 50052 9465
HEALTHCHECK --interval=10s --timeout=4s --start-period=20s --retries=3 \
  CMD ["edgedistill", "health", "--target", "127.0.0.1:50052"]
ENTRYPOINT ["edgedistill", "route"]
