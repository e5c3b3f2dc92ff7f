"""Training: the driver, the Ray Train worker loop, losses, metrics, checkpoints, outputs."""
