"""Benchmarks are opt-in: `make bench` (pytest-benchmark, --benchmark-only)."""
