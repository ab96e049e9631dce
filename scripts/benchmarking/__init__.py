"""Benchmark suite of scripts/benchmark.py (``suite``): our implementations against reference-style baselines."""
