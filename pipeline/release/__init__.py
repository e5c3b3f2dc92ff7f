"""The release layer: evaluate models on a holdout, register and promote them, the daily retrain loop."""
