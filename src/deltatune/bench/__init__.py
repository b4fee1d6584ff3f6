"""Benchmark machinery shared by `deltatune compare` and the scripts in benchmarks/ (see harness.py)."""
