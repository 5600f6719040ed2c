"""Benchmarks: one module per op plus the end-to-end sampler, all writing to one results table."""
