"""Gradient-level task balancing: Jacobian descent with torchjd's aggregators.

With `train.loss_weighting` one of `GRADIENT_METHODS`, a step does not back-propagate the
weighted sum of the task losses. It follows torchjd's multi-task recipe
(`torchjd.autojac.mtl_backward`): the shared parameters, everything below the towers (the
id tables, the input layer, every fusion level), get the Jacobian of the T weighted task
losses w_t L_t (one row per task, computed through the towers' input), and an aggregator
from torchjd turns that T x P matrix into the one direction written to their `.grad`; each
task's tower gets its own loss's gradient, as with `fixed` (the towers are stacked in one
tensor per layer, each task's slice reached by its own loss only). The aggregators:

- `upgrad`: UPGrad (Quinton and Rey, 2024), each task's gradient projected onto the dual
  cone of all of them, then averaged: no task's loss increases to first order.
- `pcgrad`: PCGrad (Yu et al., 2020), conflicting components projected away.
- `mgda`: MGDA (Desideri 2012; Sener and Koltun, 2018), the min-norm point of the convex
  hull of the task gradients.
- `imtl_g`: IMTL-G (Liu et al., 2021), the direction with equal projections on every
  task's unit gradient.

Under DDP (several Ray Train workers) the forward and the Jacobian run under the module's
`no_sync`, so DDP all-reduces nothing; instead the shared Jacobian and the towers'
gradients are averaged over the ranks in one all-reduce before the aggregation. Every rank
then aggregates the same matrix and writes the same gradient: the aggregation of the
global batch's Jacobian (the mean of the ranks' per-shard means, as DDP's own gradient is).

What it costs: T backward passes through the shared part instead of one (torchjd
vectorises them), a T x P matrix, and an all-reduce about T times DDP's. `bench/model_speed.py --balancing` prints the step time of
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
from torchjd.autojac import jac_to_grad, mtl_backward

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
        module: the training module (maybe DDP-wrapped); its network's `towers` are the
            task-specific part, every other trainable parameter is shared.
        task_weights: the config's fixed weight per task; the objectives are w_t L_t.
        seed: seeds the aggregator's own randomness (PCGrad's random task order) from
            `seed` and the step count, on every rank alike; every global RNG (CPU and GPU)
            is left as it was.

    Example:
        >>> from models import FeatureSchema, build_model
        >>> schema = FeatureSchema(num_dense=3, tasks=("a", "b"))
        >>> net = build_model({"name": "adatt", "expert_dims": [4], "tower_dims": [2]}, schema)
        >>> balancer = GradientBalancer("upgrad", net, [1.0, 1.0])
        >>> out = net({"dense": torch.randn(8, 3)})  # [8, 2]: one output per task
        >>> balancer.backward(out.mean(dim=0))
        >>> all(p.grad is not None for p in net.parameters())
        True
    """

    def __init__(
        self, method: str, module: nn.Module, task_weights: Sequence[float], seed: int = 0
    ) -> None:
        if method not in AGGREGATORS:
            raise ValueError(f"unknown gradient method {method!r}; one of {sorted(AGGREGATORS)}")
        self.method = method
        self.aggregator = AGGREGATORS[method]()
        self.module = module
        towers = _towers(module)
        tower_ids = {id(p) for p in towers.parameters()}
        self.tower_params = [p for p in towers.parameters() if p.requires_grad]
        self.shared = [p for p in module.parameters() if p.requires_grad and id(p) not in tower_ids]
        self.weights = torch.tensor(list(task_weights), dtype=torch.float32)
        self.last_weights: torch.Tensor | None = None  # each task's weight in the last step
        self.seed, self.steps = seed, 0
        self._features: torch.Tensor | None = None
        # The towers' input is the last shared representation `mtl_backward` starts from.
        towers.register_forward_pre_hook(self._keep_features)

    def _keep_features(self, _module: nn.Module, args: tuple) -> None:
        self._features = args[0]

    def no_sync(self) -> AbstractContextManager:
        """DDP's `no_sync` (its reducer must not all-reduce the gradients), else nothing."""
        if isinstance(self.module, nn.parallel.DistributedDataParallel):
            return self.module.no_sync()
        return nullcontext()

    def backward(self, per_task: torch.Tensor) -> None:
        """From the per-task losses [T] of the last forward (with their graph) to `.grad`:
        each tower its own loss's gradient, the shared parameters the aggregate."""
        if self._features is None:
            raise RuntimeError("no forward through the towers since the last backward")
        objectives = self.weights.to(per_task.device) * per_task.float()
        count = objectives.shape[0]
        mtl_backward(
            list(objectives),
            features=self._features,
            tasks_params=[self.tower_params] * count,
            shared_params=self.shared,
            # The towers are one batched module: every task's gradient passes through the
            # same graph nodes, so the graph must outlive the first task's pass.
            retain_graph=True,
        )
        self._features = None
        _average_over_ranks(self.shared, self.tower_params)
        # PCGrad projects in a random task order (`torch.randperm` on the CPU's global
        # generator, which torchjd gives no way to replace): seeded alike on every rank, so
        # their gradients stay equal, inside a fork that restores its state. Only the CPU
        # generator is seeded (`torch.manual_seed` would reseed every GPU's, and so the
        # dropout masks of every rank alike): every RNG is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed * 1_000_003 + self.steps)
            weights = jac_to_grad(self.shared, self.aggregator)
        self.steps += 1
        self.last_weights = None if weights is None else weights.detach()


def _towers(module: nn.Module) -> nn.Module:
    """The network's `towers` under the DDP and training-module wrappers."""
    for candidate in (module, getattr(module, "module", None)):
        for network in (candidate, getattr(candidate, "model", None)):
            towers = getattr(network, "towers", None)
            if isinstance(towers, nn.Module):
                return towers
    raise ValueError("gradient balancing needs a network with task `towers`")


def _average_over_ranks(shared: list[nn.Parameter], towers: list[nn.Parameter]) -> None:
    """Replace the shared parameters' `.jac` and the towers' `.grad` by their means over the
    ranks, in one all-reduce."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    rows = shared[0].jac.shape[0]
    parts = [p.jac.reshape(-1) for p in shared] + [p.grad.reshape(-1) for p in towers]
    flat = torch.cat(parts)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in shared:
        size = rows * p.numel()
        p.jac = flat[offset : offset + size].reshape(p.jac.shape)
        offset += size
    for p in towers:
        p.grad = flat[offset : offset + p.numel()].reshape(p.shape)
        offset += p.numel()
