"""Benchmarks (see bench/RESULTS.md). Each script is runnable on its own: ``python -m bench.<name>``."""
