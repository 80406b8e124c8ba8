"""The builder container: teacher traces -> fine-tuned student -> GGUF -> quantized ->
evaluated -> calibrated -> bundle. Read services/builder/pipeline.py top to bottom.

Imports torch and transformers; the runtime and router never import this package.
"""
