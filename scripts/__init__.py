"""Experiments and benchmarks, run as modules: `python -m scripts.NAME --help`."""
