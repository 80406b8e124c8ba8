"""`make bench`: every benchmark in one run; or some: python -m bench batching load."""

import sys

from bench import batching, load, router_quality, serving_overhead

BENCHES = {
    "serving": serving_overhead.main,
    "batching": batching.main,
    "router": router_quality.main,
    "load": load.main,
}

if __name__ == "__main__":
    chosen = sys.argv[1:] or list(BENCHES)
    for name in chosen:
        BENCHES[name]()
