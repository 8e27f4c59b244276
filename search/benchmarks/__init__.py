"""Benchmark scripts (not tests): each writes a report under results/benchmarks/."""
