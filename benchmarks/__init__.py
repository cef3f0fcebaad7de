"""Benchmarks against transformers + PEFT; `python -m benchmarks all` runs the lot (see README.md)."""
