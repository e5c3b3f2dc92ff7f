"""AdaTT: Adaptive Task-to-Task Fusion Network (Li et al., KDD 2023, arXiv 2304.04959, s. 3).

Notation of the paper. T tasks, L fusion levels. Level l holds one fusion unit per task;
f_t^l is the output of task t's unit, and every unit of level 1 reads the same input
embedding f^0 (the output of `FeatureInput`). The task towers read f_t^L.

Fusion unit of task t at level l (AdaTT-sp):
    E_{t,i}^l = e_{t,i}^l(f_t^{l-1}),  i = 1..m_t       (eq. 4)  the task's own experts
    E_t^l = [E_{t,1}^l, ..., E_{t,m_t}^l]                 (eq. 5)
    f_t^l = AllExpertGF_t^l + NativeExpertLF_t^l           (eq. 6)
    E^l = [E_1^l, ..., E_T^l]                              (eq. 7)  all experts of the level
    AllExpertGF_t^l = (E^l)^T G_t^l                        (eq. 8)
    G_t^l = softmax(W_t^l f_t^{l-1})                       (eq. 9)  one gate per task
    NativeExpertLF_t^l = (E_t^l)^T v_t^l                   (eq. 10)
    f_t^l = (pad(v_t^l) + G_t^l)^T E^l                     (eq. 11) both in one product

The weight v (s. 3.1, after eq. 10): "when m_1 = m_2 = ... = m_T = 1", every unit has one
expert and NativeExpertLF is E_t itself with weight 1, no parameter. Otherwise v is learned
in every unit, one-expert units and the shared unit included (as the authors'
`self_exp_weights`, initialised U(-sqrt(1/m), sqrt(1/m))). Checkpoints from before v was
learned in one-expert units of mixed models lack those entries; they load with v = 1,
which is what they trained with (`AdaTTLevel._load_from_state_dict`).

General AdaTT adds a shared fusion unit with m_s experts. Its experts join E^l, so every
task gate sees them. Its own output (read by its experts at the next level) is fused the
same way as a task's: a gate over all experts plus the native residual over its own experts
(our choice, as in the authors' code: the shared unit is treated like a task unit). At the
last level the shared unit does no fusion, since no tower reads it; its experts are still
computed for the task gates. With m_s = 0 there is no shared unit: exactly AdaTT-sp.

Speed: each level computes its experts as an `ExpertGroup` (one 2-D matmul at level 1,
where every unit reads f^0, together with the gates; one batched matmul over units at
deeper levels), and eq. 11 as a single bmm for all units. `models/reference.py` is the
literal loop version (the paper as code, the tests' oracle): it follows eqs. 4-10 one by
one and must give the same output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbone import FusionStack
from models.experts import ExpertGroup, StackedLinear


class AdaTTLevel(nn.Module):
    """One fusion level: the fusion units of every task (and the shared unit).

    Args:
        input_dim: width of f^{l-1}.
        hidden_dims: layer widths of each expert.
        experts_per_unit: m_t for each task, then m_s if there is a shared unit.
        fusing_units: units that fuse at this level (their gates exist): the tasks, plus
            the shared unit except at the last level.
        activation: expert activation.
        dropout: dropout after each expert layer.

    Example:
        >>> level = AdaTTLevel(16, [8], experts_per_unit=[2, 1, 1], fusing_units=3)
        >>> out, weights = level(torch.randn(4, 16))
        >>> out.shape, weights.shape
        (torch.Size([4, 3, 8]), torch.Size([4, 3, 4]))
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        experts_per_unit: Sequence[int],
        fusing_units: int,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.experts_per_unit = list(experts_per_unit)
        self.fusing_units = fusing_units
        self.num_experts = sum(self.experts_per_unit)
        self.offsets = [sum(self.experts_per_unit[:u]) for u in range(len(experts_per_unit))]
        # e_{t,i}^l for every unit, computed together (eqs. 4, 5, 7).
        self.experts = ExpertGroup(input_dim, hidden_dims, experts_per_unit, activation, dropout)
        self.output_dim = self.experts.output_dim
        # W_t^l of eq. 9, one gate per fusing unit over all E experts of the level.
        self.gates = StackedLinear(fusing_units, input_dim, self.num_experts)
        # v_t^l of eq. 10 for every fusing unit, unless every unit has one expert (s. 3.1).
        self.native_weights = nn.ParameterDict()
        self.learns_native = any(m != 1 for m in self.experts_per_unit)
        for unit in range(fusing_units if self.learns_native else 0):
            m = self.experts_per_unit[unit]
            if m:
                bound = math.sqrt(1.0 / m)
                self.native_weights[str(unit)] = nn.Parameter(
                    torch.empty(m).uniform_(-bound, bound)
                )
        self.register_buffer("unit_weight", torch.ones(1), persistent=False)

    def native_matrix(self) -> Tensor:
        """pad(v_t) for every fusing unit, [fusing_units, E]: v_t at the unit's own columns."""
        rows = []
        for unit in range(self.fusing_units):
            m, start = self.experts_per_unit[unit], self.offsets[unit]
            v = self.native_weights[str(unit)] if self.learns_native else self.unit_weight
            rows.append(F.pad(v, (start, self.num_experts - start - m)))
        return torch.stack(rows)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # Written before v was learned in one-expert units of mixed models: those units
        # trained with v = 1, so that is the value they load with.
        for unit, m in enumerate(self.experts_per_unit[: self.fusing_units]):
            key = f"{prefix}native_weights.{unit}"
            if m == 1 and str(unit) in self.native_weights and key not in state_dict:
                state_dict[key] = torch.ones(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Fuse one level.

        Args:
            x: f^0 [B, D] at level 1, else the previous outputs [U, B, D], unit by unit.

        Returns:
            f^l [B, fusing_units, H] and the fusion weights pad(v) + G, [B, fusing_units, E].
        """
        experts = self.experts(x)  # eqs. 4, 5, 7: [B, E, H]
        if x.dim() == 2:
            # Level 1: every gate reads f^0, one 2-D matmul.
            gates = torch.softmax(self.gates.shared(x), dim=-1)  # eq. 9
        else:
            logits = self.gates(x)  # W_t f_t^{l-1}, [units, B, E]
            gates = torch.softmax(logits, dim=-1).transpose(0, 1)  # eq. 9
        weights = gates + self.native_matrix()  # eq. 11: pad(v_t) + G_t
        return torch.bmm(weights, experts), weights  # eq. 11: (pad(v_t) + G_t)^T E


class AdaTT(FusionStack):
    """AdaTT backbone: L fusion levels, AdaTT-sp when `shared_experts` is 0.

    Args:
        input_dim: width of the input embedding f^0.
        experts_per_task: m_t for each task (may differ between tasks).
        shared_experts: m_s, experts of the shared fusion unit; 0 gives AdaTT-sp.
        level_dims: per level, the layer widths of each expert.
        activation: expert activation.
        dropout: dropout after each expert layer.

    Example:
        >>> adatt = AdaTT(32, experts_per_task=[2, 1], shared_experts=1, level_dims=[[16], [8]])
        >>> adatt(torch.randn(4, 32)).shape
        torch.Size([4, 2, 8])
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
        super().__init__("AdaTT", experts_per_task, shared_experts, len(level_dims))
        # The shared unit fuses at every level but the last (eq. 11 for it too).
        self.stack_levels(
            input_dim,
            level_dims,
            lambda width, dims, fusing: AdaTTLevel(
                width, dims, self.experts_per_unit, fusing, activation, dropout
            ),
        )
