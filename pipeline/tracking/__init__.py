"""MLflow tracking: runs, params, metrics, tag names, credentials kept out. No Ray here."""
