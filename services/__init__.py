"""edgedistill: distill a DSPy program into a small GGUF model and serve it on edge hosts.

Layout (one folder per container over a small shared core):
    core/     the contract (generated gRPC API), settings, program and bundle formats
    runtime/  the gRPC inference service (llama.cpp in-process, or Ollama)
    router/   local-first routing with an API fallback
    builder/  teacher traces -> fine-tune -> GGUF -> quantize -> evaluate -> bundle
    cli.py    the one CLI; imports each command's service lazily
"""

__version__ = "0.1.0"
