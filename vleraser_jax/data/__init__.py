"""Benchmark data: the MLLMU-Bench schema, its loader, and the synthetic benchmark written in that schema."""
