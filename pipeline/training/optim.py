"""The optimizer of the dense part and the per-epoch learning rate, for both worker
strategies (`replicas.Replicated`, `sharding.Sharded`)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from pipeline.config import TrainConfig


def embedding_tables(module: nn.Module) -> list[nn.Parameter]:
    """The weights of the module's dense id tables (`nn.Embedding`, `nn.EmbeddingBag`)."""
    return [m.weight for m in module.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)]


def make_optimizer(
    parameters: Iterable[nn.Parameter],
    train: TrainConfig,
    tables: list[nn.Parameter] | None = None,
) -> torch.optim.Optimizer:
    """Adam or AdamW over `parameters` (the network and the learned loss weights).

    With `train.embedding_lr`, the `tables` among them form a second parameter group with
    that learning rate (group 0: the rest at `train.lr`, group 1: the tables).
    """
    cls = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    parameters = list(parameters)
    if train.embedding_lr is None or not tables:
        return cls(parameters, lr=train.lr, weight_decay=train.weight_decay)
    table_ids = {id(p) for p in tables}
    rest = [p for p in parameters if id(p) not in table_ids]
    groups = [{"params": rest}, {"params": tables, "lr": train.embedding_lr}]
    return cls(groups, lr=train.lr, weight_decay=train.weight_decay)


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The multiplier of the base learning rates in `epoch` (1-based) of `epochs`."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - 0.5) / epochs))
    return 1.0


def set_epoch_lr(optimizer: object, base_lrs: list[float], train: TrainConfig, epoch: int) -> float:
    """Set each group's rate for `epoch` to its base rate times `lr_factor`; returns group 0's.

    The base rates come from the config (`make_optimizer`), not from a restored optimiser
    state, whose rates are the last epoch's scaled ones.
    """
    factor = lr_factor(train.lr_schedule, epoch, train.epochs)
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        if torch.is_tensor(group["lr"]):  # a captured step reads it from the device
            group["lr"].fill_(base * factor)
        else:
            group["lr"] = base * factor
    return base_lrs[0] * factor


def base_rates(optimizer: object) -> list[float]:
    """Each parameter group's learning rate now, as floats (the schedule's base rates)."""
    return [float(group["lr"]) for group in optimizer.param_groups]
