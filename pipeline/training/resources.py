"""What a training's workers ask Ray for, decided from the config and the cluster's resources
before anything is written, so a run never waits forever for resources the cluster lacks.

- `train.use_gpu: auto` trains on GPUs when the cluster has a worker's share of one.
- `train.gpus_per_worker` may be a fraction: small models (a census-sized trial uses a few
  percent of a GPU) share one GPU between workers, or between the trials of a search.
- `train.num_workers: auto` is one worker per `gpus_per_worker` share of the cluster's
  GPUs, or `CPU_WORKERS` on CPUs.
- A request that the cluster cannot hold (more GPU shares than there are GPUs), or a
  `cuda_graph` step without a GPU, is a `ConfigError` naming the fields, before the MLflow
  run is created.

Pure arithmetic over `ray.cluster_resources()`, so it is tested with Ray's declared
resources on a machine without GPUs (`ray.init(num_gpus=...)`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.config import Config, TrainConfig
from pipeline.errors import ConfigError
from pipeline.training.step import check_graph_workers

CPU_WORKERS = 2  # `num_workers: auto` without GPUs: two workers of `cpus_per_worker` each
_EPS = 1e-9


def resolve_use_gpu(train: TrainConfig, cluster: Mapping[str, float]) -> bool:
    """Whether the workers train on GPUs: `train.use_gpu`, where `auto` means "when the
    cluster's resources (`ray.cluster_resources()`) hold a worker's share of a GPU"
    (`train.gpus_per_worker`, one whole GPU by default)."""
    if train.use_gpu == "auto":
        return cluster.get("GPU", 0.0) >= train.gpus_per_worker - _EPS
    return bool(train.use_gpu)


@dataclass(frozen=True)
class WorkerPlan:
    """The workers of one training: how many, and what each reserves.

    Example:
        >>> from pipeline.config import TrainConfig
        >>> plan_workers(TrainConfig(), {"CPU": 16.0, "GPU": 1.0})
        WorkerPlan(num_workers=1, use_gpu=True, cpus_per_worker=0.5, gpus_per_worker=1.0)
        >>> plan_workers(TrainConfig(gpus_per_worker=0.25), {"CPU": 16.0, "GPU": 1.0}).num_workers
        4
        >>> plan_workers(TrainConfig(), {"CPU": 2.0}).num_workers
        2
    """

    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    gpus_per_worker: float  # 0 on CPUs

    def resources(self) -> dict[str, float]:
        """`ScalingConfig(resources_per_worker=...)`."""
        out = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            out["GPU"] = self.gpus_per_worker
        return out

    @property
    def gpus(self) -> float:
        """GPUs the whole worker group reserves."""
        return self.num_workers * self.gpus_per_worker


def plan_workers(train: TrainConfig, cluster: Mapping[str, float]) -> WorkerPlan:
    """The workers `train` asks for on a cluster with `cluster`'s resources; ConfigError
    naming the fields when the cluster cannot hold them (module docstring)."""
    use_gpu = resolve_use_gpu(train, cluster)
    gpus = cluster.get("GPU", 0.0)
    if train.step_mode == "cuda_graph" and not use_gpu:
        raise ConfigError(
            "train.step_mode: cuda_graph captures the train step on a GPU, but the cluster "
            f"has no GPU (train.use_gpu: {train.use_gpu}); use eager or auto"
        )
    share = train.gpus_per_worker if use_gpu else 0.0
    if train.num_workers != "auto":
        workers = train.num_workers
    elif use_gpu:
        workers = max(1, math.floor(gpus / share + _EPS))
    else:
        workers = CPU_WORKERS
    if use_gpu and workers * share > gpus + _EPS:
        fit = math.floor(gpus / share + _EPS)
        raise ConfigError(
            f"train.num_workers: {workers} worker(s) x train.gpus_per_worker {share:g} need "
            f"{workers * share:g} GPU(s), and the cluster has {gpus:g}; set "
            f"train.num_workers: auto ({fit} here), or share GPUs with train.gpus_per_worker: "
            f"{gpus / workers:g}, or train on CPUs with train.use_gpu: false"
        )
    if use_gpu:
        check_graph_workers(train.step_mode, workers)
    return WorkerPlan(workers, use_gpu, train.cpus_per_worker, share)


def with_workers(config: Config, plan: WorkerPlan) -> Config:
    """`config` with `train.num_workers` as the plan decided (what the run logs and its
    checkpoints keep, so a resume runs the same world size)."""
    train = config.train.model_copy(update={"num_workers": plan.num_workers})
    return config.model_copy(update={"train": train})
