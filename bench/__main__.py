"""`make bench`: every benchmark, in one run."""

from bench import serving_overhead

if __name__ == "__main__":
    serving_overhead.main()
