# The runtime: gRPC inference over a bundle's GGUF, llama.cpp in-process. No torch.
# Build offline from the host's wheelhouse (scripts/wheelhouse.sh):
#   podman build -f docker/runtime.Dockerfile --build-arg BASE_IMAGE=... -t edgedistill-runtime .
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS install
COPY dist/wheelhouse /wheels
# --no-index: every package comes from the wheelhouse; nothing is fetched during the build.
RUN python3 -m venv /opt/edgedistill \
 && /opt/edgedistill/bin/pip install --no-cache-dir --no-index --find-links /wheels edgedistill \
 && find /opt/edgedistill -name '__pycache__' -prune -exec rm -rf {} + \
 && /opt/edgedistill/bin/python -m compileall -q /opt/edgedistill/lib

FROM ${BASE_IMAGE}
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin edgedistill
COPY --from=install /opt/edgedistill /opt/edgedistill
ENV PATH=/opt/edgedistill/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    DSPY_CACHEDIR=/tmp/dspy-cache \
    EDGEDISTILL_HOST=0.0.0.0 \
    EDGEDISTILL_PORT=50051 \
    EDGEDISTILL_METRICS_PORT=9464 \
    EDGEDISTILL_BUNDLE=/bundle
USER 10001
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=4s --start-period=60s --retries=3 \
  CMD ["edgedistill", "health", "--target", "127.0.0.1:50051"]
ENTRYPOINT ["edgedistill", "serve"]
