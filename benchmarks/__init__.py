"""Runnable benchmarks; each appends a section to BENCHMARKS.md."""
