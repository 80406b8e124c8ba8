"""`make bench`: every benchmark in one run; or some: python -m bench batching load."""

import sys

from bench import (
    batching,
    edge_loop,
    gguf_read,
    load,
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
}

if __name__ == "__main__":
    chosen = sys.argv[1:] or list(BENCHES)
    unknown = [name for name in chosen if name not in BENCHES]
    if unknown:
        names = ", ".join(BENCHES)
        sys.exit(f"bench: no benchmark named {', '.join(unknown)}; choose from {names}")
    for name in chosen:
        BENCHES[name]()
