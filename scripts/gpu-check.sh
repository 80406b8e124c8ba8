#!/usr/bin/env bash
# `make gpu-check`: the build's student, finetune, export and quantize stages of the embedded
# ticket-triage spec on a CUDA GPU (bf16), measured: steps per second, the fine-tune's wall
# time, peak GPU memory, final loss, the export self-check, and the exported model's greedy
# answers on the dev tickets. With a CPU run of the same spec and seed beside it
# (DEVICE=cpu, or build/device-check/cpu.json copied from another host) it prints how many
# dev tickets the two models answer alike (agreement.json lists the ones that differ).
# docs/building.md ("On a GPU") has the figures.
#
#   DEVICE    cuda (default), cpu (the reference) or auto
#   CHECK_DIR where the build folders and <device>.json go (default build/device-check)
#   PYTHON    the interpreter with torch, transformers and peft (default .venv's, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
CHECK_DIR=${CHECK_DIR:-build/device-check}
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
mkdir -p "$CHECK_DIR"

"$PYTHON" -m services.builder.device_check --device "$DEVICE" --out "$CHECK_DIR"
other=$([ "$DEVICE" = cpu ] && echo cuda || echo cpu)
if [ -f "$CHECK_DIR/$other.json" ]; then
  "$PYTHON" -m services.builder.device_check --compare "$CHECK_DIR/cpu.json" "$CHECK_DIR/cuda.json" \
    --record "$CHECK_DIR/agreement.json"
fi
