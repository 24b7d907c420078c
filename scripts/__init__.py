"""Experiments, run as modules: `python -m scripts.NAME --help` (benchmarks live in bench/)."""
