"""Benchmarks: each script prints a table and ends with one JSON line of its figures."""
