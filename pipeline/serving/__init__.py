"""The logged scoring model, the registry, and batch scoring of raw logs."""
