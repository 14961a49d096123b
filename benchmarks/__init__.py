"""The benchmark harness (python -m benchmarks) and the older single-purpose scripts."""
