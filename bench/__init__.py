"""Benchmarks: `python -m bench [--full] [--only NAME]` runs every bench_*.py and writes bench/results.json."""
