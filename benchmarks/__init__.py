"""Benchmarks of gaspar, run from the repository root.

``python -m benchmarks`` runs the end-to-end harness (see benchmarks/README.md);
``python -m benchmarks.framing_bench`` times the framing cores alone.
"""
