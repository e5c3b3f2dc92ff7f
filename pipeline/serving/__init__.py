"""Serving: a logged model loaded to score raw logs (the MLflow loader, batch scoring)."""
