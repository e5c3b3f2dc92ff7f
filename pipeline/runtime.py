"""The Ray runtime a command runs on: start or join Ray, where checkpoints go, GPUs or not.

Shared by training, batch scoring and the search, so none of them imports another's driver.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import ray

from pipeline.config import TrainConfig


def init_ray() -> None:
    """Connect to RAY_ADDRESS's cluster, or start a local one."""
    if not ray.is_initialized():
        # A local cluster's dashboard listens on loopback only.
        ray.init(dashboard_host="127.0.0.1", log_to_driver=True)


def storage_uri(path: str) -> str:
    """Ray Train needs an absolute path or a URI for checkpoints."""
    return path if "://" in path else str(Path(path).resolve())


def resolve_use_gpu(train: TrainConfig, cluster: Mapping[str, float]) -> bool:
    """Whether the workers train on GPUs: `train.use_gpu`, where `auto` means "when the
    cluster's resources (`ray.cluster_resources()`) hold at least one GPU"."""
    if train.use_gpu == "auto":
        return cluster.get("GPU", 0.0) >= 1
    return bool(train.use_gpu)
