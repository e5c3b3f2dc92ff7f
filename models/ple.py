"""PLE: Progressive Layered Extraction (Tang et al., RecSys 2020), stacked CGC levels.

Each level has a unit per task with m_t experts and a shared unit with m_s experts; unit
u's experts read unit u's output of the level below (every unit reads the input embedding
at level 1). Task t's gate mixes its own and the shared experts; the shared gate mixes all
experts; at the last level the shared unit has no gate. Gates read their unit's input.

The gates are one `MaskedStackedLinear` over all E experts of the level: it stores only
the weights towards the experts each gate sees (the parameter count is PLE's own, for
matched-budget comparisons), and scatters them into one stacked layer whose other logits
are masked to -inf. This keeps one batched matmul per level and gives fusion weights in
the same tasks x experts layout as AdaTT's (zeros where PLE has no edge).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from models.backbone import FusionStack
from models.experts import ExpertGroup, MaskedStackedLinear


class CGCLevel(nn.Module):
    """One customized gate control level; `fusing_units` is T, or T + 1 with the shared gate."""

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        experts_per_unit: Sequence[int],
        fusing_units: int,
        has_shared: bool,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        units = list(experts_per_unit)
        self.fusing_units, self.num_experts = fusing_units, sum(units)
        self.experts = ExpertGroup(input_dim, hidden_dims, units, activation, dropout)
        self.output_dim = self.experts.output_dim
        offsets = [sum(units[:u]) for u in range(len(units))]
        num_tasks = len(units) - (1 if has_shared else 0)
        visible = [[False] * self.num_experts for _ in range(fusing_units)]
        for row in range(fusing_units):
            for e in range(self.num_experts):
                own = offsets[row] <= e < offsets[row] + units[row]
                shared = has_shared and e >= offsets[-1]
                # The shared gate (row T) sees every expert; a task's its own and the shared.
                visible[row][e] = row == num_tasks or own or shared
        self.register_buffer("visible", torch.tensor(visible), persistent=False)
        self.gates = MaskedStackedLinear(input_dim, visible)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [B, D] at level 1 else [U, B, D]; returns outputs [B, rows, H], gates [B, rows, E]."""
        experts = self.experts(x)
        if x.dim() == 2:
            logits = self.gates.shared(x)  # [B, rows, E]
            hidden = ~self.visible
        else:
            logits = self.gates(x)  # [rows, B, E]
            hidden = ~self.visible.unsqueeze(1)
        gates = torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1)
        if x.dim() == 3:
            gates = gates.transpose(0, 1)
        return torch.bmm(gates, experts), gates


class PLE(FusionStack):
    """PLE backbone; one level is CGC.

    Args: the same as `models.adatt.AdaTT`'s, which the builder passes to both; with
    `shared_experts` 0 each task's gate sees only its own experts.

    Example:
        >>> ple = PLE(32, experts_per_task=[2, 2], shared_experts=1, level_dims=[[16], [8]])
        >>> ple(torch.randn(5, 32)).shape
        torch.Size([5, 2, 8])
    """

    def __init__(
        self,
        input_dim: int,
        experts_per_task: Sequence[int],
        shared_experts: int,
        level_dims: Sequence[Sequence[int]],
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__("PLE", experts_per_task, shared_experts, len(level_dims))
        has_shared = shared_experts > 0
        self.stack_levels(
            input_dim,
            level_dims,
            lambda width, dims, fusing: CGCLevel(
                width, dims, self.experts_per_unit, fusing, has_shared, activation, dropout
            ),
        )
