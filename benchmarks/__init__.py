"""Reproducible measurements behind docs/results (run each as `python -m benchmarks.NAME`)."""
