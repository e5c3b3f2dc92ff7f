"""The interface every backbone (AdaTT and the baselines) implements."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class Backbone(nn.Module):
    """Maps the input vector [B, D] to one representation per task [B, T, H].

    Subclasses set `output_dim` (H) and implement `forward_with_weights`, which also returns
    the fusion weights of each gated level, [B, rows, experts], for inspection.
    """

    output_dim: int

    def forward_with_weights(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Task representations [B, T, H] and per-level fusion weights ([] without gates)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Task representations [B, T, H]."""
        return self.forward_with_weights(x)[0]

    def fusion_weight_labels(self, tasks: Sequence[str]) -> list[tuple[list[str], list[str]]]:
        """(row names, column names) of each level's fusion weights; [] without gates."""
        return []


def expert_labels(tasks: Sequence[str], experts_per_unit: Sequence[int]) -> list[str]:
    """Column names "task/e0", ..., "shared/e0" for experts numbered unit by unit."""
    units = [*tasks, "shared"][: len(experts_per_unit)]
    return [
        f"{unit}/e{i}" for unit, m in zip(units, experts_per_unit, strict=True) for i in range(m)
    ]
