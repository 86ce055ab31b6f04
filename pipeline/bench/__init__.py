"""Benchmarks of the hot paths against their physical floors (`make bench`, jobs/benchmark.py)."""
