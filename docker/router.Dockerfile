# The router: local first, API fallback. The API key comes from a secret at run time, never
# from the image or the bundle.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS install
COPY dist/wheelhouse /wheels
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
    EDGEDISTILL_ROUTER_HOST=0.0.0.0 \
    EDGEDISTILL_ROUTER_PORT=50052 \
    EDGEDISTILL_ROUTER_METRICS_PORT=9465 \
    EDGEDISTILL_ROUTER_BUNDLE=/bundle
USER 10001
EXPOSE 50052 9465
HEALTHCHECK --interval=10s --timeout=4s --start-period=20s --retries=3 \
  CMD ["edgedistill", "health", "--target", "127.0.0.1:50052"]
ENTRYPOINT ["edgedistill", "route"]
