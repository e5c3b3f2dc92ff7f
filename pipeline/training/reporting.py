"""What a worker reports each epoch, and the reductions across workers it needs: shared by
both worker strategies (`replicas.Replicated`, `sharding.Sharded`) and the loop."""

from __future__ import annotations

import resource

import ray.train
import torch
import torch.distributed as dist


def report(metrics: dict[str, float], folder: str | None) -> None:
    """`ray.train.report` from this worker, with the checkpoint folder it wrote (if any).
    Every worker reports (a barrier); Ray Train merges the workers' folders into one."""
    checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
    ray.train.report(metrics, checkpoint=checkpoint)


def all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """`values` summed (or maxed, `op="max"`) over every worker, in float64."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.tolist()


def peak_memory_bytes() -> int:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def nbytes(tensor: torch.Tensor) -> int:
    """The bytes a tensor's elements take."""
    return tensor.numel() * tensor.element_size()
