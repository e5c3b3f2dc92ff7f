"""MMoE (Ma et al., KDD 2018) and its multi-level extension ML-MMoE, as in the AdaTT paper.

Level l has N experts. At level 1 every expert reads the input embedding; at deeper levels
expert n reads its own mixture of the previous level's experts. Each mixture is a softmax
gate over the level's N experts: at a level below the last there is one gate per
next-level expert, at the last level one gate per task. As in MMoE and the AdaTT authors'
ML-MMoE, every gate reads the input embedding, so the gates of all levels are one matmul.
One level is plain MMoE.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from models.backbone import Backbone
from models.experts import ExpertGroup


class MLMMoE(Backbone):
    """Multi-level MMoE; one entry in `level_dims` is MMoE.

    Args:
        input_dim: width of the input embedding.
        num_tasks: T.
        num_experts: N, experts per level.
        level_dims: per level, the layer widths of each expert.
        activation: expert activation.
        dropout: dropout after each expert layer.

    Example:
        >>> mmoe = MLMMoE(32, num_tasks=2, num_experts=4, level_dims=[[16], [8]])
        >>> mmoe(torch.randn(5, 32)).shape
        torch.Size([5, 2, 8])
    """

    def __init__(
        self,
        input_dim: int,
        num_tasks: int,
        num_experts: int,
        level_dims: Sequence[Sequence[int]],
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError("tasks: MMoE needs at least one task")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not level_dims:
            raise ValueError("expert_dims: MMoE needs at least one level")
        self.num_tasks, self.num_experts = num_tasks, num_experts
        levels = len(level_dims)
        # Gates per level: one per next-level expert, one per task at the last level.
        self.gate_rows = [num_experts] * (levels - 1) + [num_tasks]
        self.levels = nn.ModuleList()
        width = input_dim
        for index, dims in enumerate(level_dims):
            # Level 1: one unit of N experts reading x; deeper: N units of one expert each.
            units = [num_experts] if index == 0 else [1] * num_experts
            self.levels.append(ExpertGroup(width, list(dims), units, activation, dropout))
            width = self.levels[-1].output_dim
        self.output_dim = width
        self.gates = nn.Linear(input_dim, sum(self.gate_rows) * num_experts)

    def forward_with_weights(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Task representations [B, T, H] and each level's gate softmax [B, rows, N]."""
        experts, logits = self.levels[0](x), self.gates(x)  # all gates of all levels
        sizes = [rows * self.num_experts for rows in self.gate_rows]
        weights = [
            torch.softmax(part.unflatten(1, (-1, self.num_experts)), dim=-1)
            for part in logits.split(sizes, dim=1)
        ]
        mixed = torch.bmm(weights[0], experts)
        for level, gate in zip(self.levels[1:], weights[1:], strict=True):
            mixed = torch.bmm(gate, level(mixed.transpose(0, 1)))
        return mixed, weights

    def fusion_weight_labels(self, tasks: Sequence[str]) -> list[tuple[list[str], list[str]]]:
        """Rows: next-level experts ("next/e0", ...) or tasks at the last level."""
        columns = [f"e{i}" for i in range(self.num_experts)]
        inner = [f"next/e{i}" for i in range(self.num_experts)]
        return [
            (list(tasks) if i == len(self.levels) - 1 else list(inner), list(columns))
            for i in range(len(self.levels))
        ]
