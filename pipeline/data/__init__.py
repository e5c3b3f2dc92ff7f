"""Data: input files and footers, checks, splits, hashing, preprocessing and Ray Data ingest.

No training, serving or MLflow here (import-linter contract in pyproject.toml)."""
