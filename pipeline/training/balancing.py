"""Gradient-level task balancing: Jacobian descent with torchjd's aggregators.

With `train.loss_weighting` one of `GRADIENT_METHODS`, a step does not back-propagate the
weighted sum of the task losses. It computes the Jacobian of the T weighted task losses
w_t L_t with respect to every trainable parameter (`torchjd.autojac.backward`: one row per
task; a tower's rows for other tasks are zero), and an aggregator from torchjd turns that
T x P matrix into the one update direction written to `.grad`:

- `upgrad`: UPGrad (Quinton and Rey, 2024), each task's gradient projected onto the dual
  cone of all of them, then averaged: no task's loss increases to first order.
- `pcgrad`: PCGrad (Yu et al., 2020), conflicting components projected away.
- `mgda`: MGDA (Desideri 2012; Sener and Koltun, 2018), the min-norm point of the convex
  hull of the task gradients.
- `imtl_g`: IMTL-G (Liu et al., 2021), the direction with equal projections on every
  task's unit gradient.

Under DDP (several Ray Train workers) the forward and the Jacobian run under the module's
`no_sync`, so DDP all-reduces nothing; instead the Jacobian itself is averaged over the
ranks in one all-reduce before the aggregation. Every rank then aggregates the same matrix
and writes the same gradient, which is the aggregation of the global batch's Jacobian (the
mean of the ranks' per-shard means, as DDP's own gradient is).

What it costs: T backward passes instead of one (torchjd vectorises them), a T x P matrix,
and an all-reduce T times DDP's. `bench/model_speed.py --balancing` prints the step time of
each method next to `fixed`. Eager steps and dense id tables only: a captured or compiled
step has one backward in its graph, and TorchRec's tables update inside their backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torchjd.aggregation import IMTLG, MGDA, Aggregator, PCGrad, UPGrad
from torchjd.autojac import backward, jac_to_grad

from pipeline.config import GRADIENT_METHODS

AGGREGATORS: dict[str, type[Aggregator]] = {
    "upgrad": UPGrad,
    "pcgrad": PCGrad,
    "mgda": MGDA,
    "imtl_g": IMTLG,
}
assert set(AGGREGATORS) == set(GRADIENT_METHODS)  # the config's list of methods


class GradientBalancer:
    """Writes the aggregated task gradient into `.grad` of the module's parameters.

    Args:
        method: one of `GRADIENT_METHODS`.
        module: the training module (maybe DDP-wrapped); its trainable parameters are the
            Jacobian's columns.
        task_weights: the config's fixed weight per task; the objectives are w_t L_t.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> balancer = GradientBalancer("upgrad", net, [1.0, 1.0])
        >>> out = net(torch.ones(1, 2))[0]
        >>> balancer.backward(torch.stack([out[0], -out[0] + out[1]]))
        >>> tuple(net.weight.grad.shape)
        (2, 2)
    """

    def __init__(self, method: str, module: nn.Module, task_weights: Sequence[float]) -> None:
        if method not in AGGREGATORS:
            raise ValueError(f"unknown gradient method {method!r}; one of {sorted(AGGREGATORS)}")
        self.method = method
        self.aggregator = AGGREGATORS[method]()
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.weights = torch.tensor(list(task_weights), dtype=torch.float32)
        self.last_weights: torch.Tensor | None = None  # each task's weight in the last step

    def no_sync(self) -> AbstractContextManager:
        """DDP's `no_sync` (its reducer must not all-reduce the gradients), else nothing."""
        if isinstance(self.module, nn.parallel.DistributedDataParallel):
            return self.module.no_sync()
        return nullcontext()

    def backward(self, per_task: torch.Tensor) -> None:
        """From the per-task losses [T] (with their graph) to aggregated `.grad` fields."""
        objectives = self.weights.to(per_task.device) * per_task.float()
        backward(objectives, inputs=self.params)
        _average_jacobians(self.params)
        weights = jac_to_grad(self.params, self.aggregator)
        self.last_weights = None if weights is None else weights.detach()


def _average_jacobians(params: list[nn.Parameter]) -> None:
    """Replace each parameter's `.jac` by its mean over the ranks, in one all-reduce."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch.cat([p.jac.reshape(p.jac.shape[0], -1) for p in params], dim=1)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        size = p.numel()
        p.jac = flat[:, offset : offset + size].reshape(p.jac.shape)
        offset += size
