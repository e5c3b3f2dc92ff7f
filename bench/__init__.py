"""Benchmarks that train through the product path and write figures to docs/results/."""
