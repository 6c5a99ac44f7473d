"""``cdvm bench``: reproducible benchmarks (medians, p95s, interleaved ratios) against reference implementations."""
