"""Benchmarks for sheri-trio (``python -m bench``)."""
