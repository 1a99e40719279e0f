"""Benchmarks and studies; run each as `python -m benchmarks.<name>` from the repository root."""
