"""`make bench`: every CPU benchmark in one run; or some: python -m bench batching load.
`cuda` runs only when named: it needs llama-cpp-python built with CUDA and a GPU."""

import sys

if "cuda" in sys.argv[1:]:
    import llama_cpp  # noqa: F401  (before numpy: see services/cli/__init__.py)

from bench import (
    batching,
    cuda_runtime,
    edge_loop,
    embeddings,
    gguf_read,
    kv_cache,
    load,
    predict_stream,
    router_capacity,
    router_confidence,
    router_quality,
    serving_overhead,
    typed_decoding,
)

BENCHES = {
    "serving": serving_overhead.main,
    "batching": batching.main,
    "router": router_quality.main,
    "load": load.main,
    "typed": typed_decoding.main,
    "capacity": router_capacity.main,
    "edge": edge_loop.main,
    "gguf": gguf_read.main,
    "confidence": router_confidence.main,
    "embeddings": embeddings.main,
    "kv": kv_cache.main,
    "stream": predict_stream.main,
    "cuda": cuda_runtime.main,
}
GPU_ONLY = {"cuda"}

if __name__ == "__main__":
    chosen = sys.argv[1:] or [name for name in BENCHES if name not in GPU_ONLY]
    unknown = [name for name in chosen if name not in BENCHES]
    if unknown:
        names = ", ".join(BENCHES)
        sys.exit(f"bench: no benchmark named {', '.join(unknown)}; choose from {names}")
    for name in chosen:
        BENCHES[name]()
