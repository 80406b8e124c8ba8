#!/bin/sh
# Import a bundle's GGUF into an existing Ollama, with the bundle's Modelfile (its TEMPLATE and
# stop strings match the GGUF's chat template, so Ollama prompts the model as it was trained).
#   scripts/ollama-import.sh BUNDLE_DIR [MODEL_NAME]
# Then serve it through the runtime: edgedistill serve --backend ollama --ollama-model NAME
#   --program BUNDLE_DIR/program/program.json
set -eu
bundle=${1:?usage: ollama-import.sh BUNDLE_DIR [MODEL_NAME]}
[ -f "$bundle/Modelfile" ] || { echo "ollama-import: $bundle has no Modelfile" >&2; exit 1; }
name=${2:-$(sed -n 's/^  "name": "\(.*\)",$/\1/p' "$bundle/manifest.json")}
command -v ollama >/dev/null 2>&1 || { echo "ollama-import: the ollama CLI is not installed" >&2; exit 1; }
(cd "$bundle" && ollama create "$name" -f Modelfile)
echo "ollama-import: imported $name; try: ollama run $name"
