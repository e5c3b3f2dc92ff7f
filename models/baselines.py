"""The simpler baselines of the AdaTT paper: shared-bottom, single-task and cross-stitch.

(MMoE / ML-MMoE live in `models/mmoe.py`, PLE in `models/ple.py`.) All three use one
network per task or one for all, built from the same batched `ExpertGroup`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from models.backbone import Backbone
from models.experts import ExpertGroup


class SharedBottom(Backbone):
    """One MLP shared by all tasks; each tower reads its output.

    Example:
        >>> SharedBottom(32, num_tasks=3, hidden_dims=[16, 8])(torch.randn(5, 32)).shape
        torch.Size([5, 3, 8])
    """

    per_task = False  # SingleTask: one MLP per task instead of one for all

    def __init__(
        self,
        input_dim: int,
        num_tasks: int,
        hidden_dims: Sequence[int],
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        groups = [num_tasks if self.per_task else 1]
        self.networks = ExpertGroup(input_dim, hidden_dims, groups, activation, dropout)
        self.output_dim = self.networks.output_dim
        self._register_load_state_dict_pre_hook(_renamed_bottom)

    def forward_with_weights(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self.networks(x).expand(-1, self.num_tasks, -1), []  # [B, 1 or T, H]


def _renamed_bottom(state: dict, prefix: str, *args: object) -> None:
    """Checkpoints written before SharedBottom and SingleTask shared one class name the
    shared MLP `bottom`; they load under its name now, `networks`."""
    for key in [k for k in state if k.startswith(f"{prefix}bottom.")]:
        state[f"{prefix}networks.{key[len(prefix) + len('bottom.') :]}"] = state.pop(key)


class SingleTask(SharedBottom):
    """An independent MLP per task (no sharing at all), computed as one batched group.

    Example:
        >>> SingleTask(32, num_tasks=3, hidden_dims=[16, 8])(torch.randn(5, 32)).shape
        torch.Size([5, 3, 8])
    """

    per_task = True


class CrossStitch(Backbone):
    """Cross-stitch networks (Misra et al., CVPR 2016): one network per task per level, and
    after each level a learned T x T stitch unit mixing the task outputs.

    `stitch_init`: `identity` (the default: each task starts from its own network only) or
    `linear`, `nn.Linear`'s default init, U(-1/sqrt(T), 1/sqrt(T)), as in the authors' AdaTT
    baseline (`mtl_lib.py`), whose runs the paper's tables report.

    Example:
        >>> CrossStitch(32, num_tasks=3, level_dims=[[16], [8]])(torch.randn(5, 32)).shape
        torch.Size([5, 3, 8])
    """

    def __init__(
        self,
        input_dim: int,
        num_tasks: int,
        level_dims: Sequence[Sequence[int]],
        activation: str = "relu",
        dropout: float = 0.0,
        stitch_init: str = "identity",
    ) -> None:
        super().__init__()
        if not level_dims:
            raise ValueError("expert_dims: cross-stitch needs at least one level")
        if stitch_init not in ("identity", "linear"):
            raise ValueError(f"stitch_init: 'identity' or 'linear', not {stitch_init!r}")
        self.levels = nn.ModuleList()
        width = input_dim
        for index, dims in enumerate(level_dims):
            units = [num_tasks] if index == 0 else [1] * num_tasks
            self.levels.append(ExpertGroup(width, list(dims), units, activation, dropout))
            width = self.levels[-1].output_dim
        self.output_dim = width
        self.stitches = nn.ParameterList(
            nn.Parameter(
                torch.eye(num_tasks)
                if stitch_init == "identity"
                else nn.Linear(num_tasks, num_tasks, bias=False).weight.detach().clone()
            )
            for _ in range(len(level_dims))
        )

    def forward_with_weights(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        h = x
        for level, stitch in zip(self.levels, self.stitches, strict=True):
            mixed = torch.matmul(stitch, level(h))  # [T, T] @ [B, T, H]: task t mixes all tasks
            h = mixed.transpose(0, 1)
        return mixed, []
