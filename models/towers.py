"""Task towers: one MLP per task, all computed with batched matmuls, one output each."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from models.experts import StackedLinear, activation_fn


class Towers(nn.Module):
    """A tower per task: hidden layers (Linear -> activation -> dropout), then Linear -> 1.

    Args:
        input_dim: width of each task's representation.
        num_tasks: T.
        hidden_dims: hidden widths of each tower; empty gives a linear head.
        activation: hidden-layer activation.
        dropout: dropout after each hidden layer.

    Example:
        >>> import torch
        >>> towers = Towers(input_dim=8, num_tasks=3, hidden_dims=[4])
        >>> towers(torch.randn(5, 3, 8)).shape
        torch.Size([5, 3])
    """

    def __init__(
        self,
        input_dim: int,
        num_tasks: int,
        hidden_dims: Sequence[int] = (),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError("tasks: towers need at least one task")
        if any(d < 1 for d in hidden_dims):
            raise ValueError(f"tower_dims must be >= 1, got {list(hidden_dims)}")
        widths = [input_dim, *hidden_dims]
        self.hidden = nn.ModuleList(
            StackedLinear(num_tasks, d_in, d_out)
            for d_in, d_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.head = StackedLinear(num_tasks, widths[-1], 1)
        self.activation = activation_fn(activation)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        """Task representations [B, T, H] -> one output per task [B, T]."""
        h = x.transpose(0, 1)  # tasks as the batch of the bmm
        for layer in self.hidden:
            h = F.dropout(self.activation(layer(h)), self.dropout, self.training)
        return self.head(h).squeeze(-1).t()
