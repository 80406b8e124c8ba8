#!/usr/bin/env bash
# Generate the Python gRPC stubs from proto/ into services/core/api/ (not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=services/core/api
rm -rf "$OUT/edgedistill"
.venv/bin/python -m grpc_tools.protoc -Iproto \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  proto/edgedistill/v1/inference.proto
touch "$OUT/edgedistill/__init__.py" "$OUT/edgedistill/v1/__init__.py"
# protoc writes absolute imports rooted at the proto path; the stubs live inside our package.
sed -i 's/^from edgedistill\.v1 import/from services.core.api.edgedistill.v1 import/' \
  "$OUT/edgedistill/v1/inference_pb2_grpc.py"
