"""Masked multi-task losses and the train-time wrapper that owns them.

Each task's loss is averaged over the rows where its label is observed (mask 1), so a
missing label contributes nothing, not a zero. Tasks are summed with fixed weights from the
config, or with learned uncertainty weights (Kendall, Gal and Cipolla, CVPR 2018).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models import build_model
from pipeline.config import Config


class MultiTaskLoss(nn.Module):
    """Weighted sum of per-task masked losses.

    Args:
        task_types: `binary` (BCE with logits) or `regression` (MSE) per task.
        task_weights: fixed weight per task (scales the uncertainty-weighted terms too).
        weighting: `fixed`, or `uncertainty` with one learned log-variance s_t per task:
            binary exp(-s_t) L_t + s_t / 2, regression exp(-s_t) L_t / 2 + s_t / 2. The
            gradient-level methods (`pipeline.config.GRADIENT_METHODS`) take the unweighted
            per-task losses and weight them themselves; the total is then the fixed sum.

    Example:
        >>> loss = MultiTaskLoss(["binary"], [1.0])
        >>> total, per_task = loss(torch.zeros(4, 1), torch.ones(4, 1), torch.ones(4, 1))
        >>> round(float(total), 4)
        0.6931
    """

    def __init__(
        self,
        task_types: Sequence[str],
        task_weights: Sequence[float],
        weighting: str = "fixed",
    ) -> None:
        super().__init__()
        if len(task_types) != len(task_weights):
            raise ValueError("task_types and task_weights must have one entry per task")
        self.binary = [t == "binary" for t in task_types]
        self.register_buffer("weights", torch.tensor(list(task_weights), dtype=torch.float32))
        self.log_vars = (
            nn.Parameter(torch.zeros(len(task_types))) if weighting == "uncertainty" else None
        )

    def forward(
        self,
        outputs: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor,
        sample_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (total loss, per-task losses [T]); all inputs are [B, T] (weight [B]).

        The per-task losses keep their graph (a gradient-level method differentiates each);
        detach them to log them."""
        outputs = outputs.float()
        per_task = []
        for i, is_binary in enumerate(self.binary):
            if is_binary:
                raw = F.binary_cross_entropy_with_logits(
                    outputs[:, i], labels[:, i], reduction="none"
                )
            else:
                raw = (outputs[:, i] - labels[:, i]) ** 2
            w = mask[:, i] if sample_weight is None else mask[:, i] * sample_weight
            # clamp: a batch where a task has no observed label gives that task a zero loss.
            per_task.append((raw * w).sum() / w.sum().clamp_min(1e-12))
        losses = torch.stack(per_task)
        if self.log_vars is None:
            return (self.weights * losses).sum(), losses
        scale = torch.tensor([1.0 if b else 0.5 for b in self.binary], device=losses.device)
        terms = scale * torch.exp(-self.log_vars) * losses + 0.5 * self.log_vars
        return (self.weights * terms).sum(), losses


class TrainingModel(nn.Module):
    """The network plus its loss: what Ray Train wraps in DDP, so that learned loss
    weights are synchronised like any other parameter."""

    def __init__(self, model: nn.Module, loss: MultiTaskLoss) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (total loss, per-task losses, model outputs [B, T])."""
        outputs = self.model(batch)
        total, per_task = self.loss(outputs, batch["labels"], batch["mask"], batch.get("weight"))
        return total, per_task, outputs


def build_training_model(config: Config) -> TrainingModel:
    """The network plus its multi-task loss, as configured."""
    model = build_model(config.model, config.data.feature_schema())
    loss = MultiTaskLoss(
        [t.type for t in config.data.tasks],
        [t.weight for t in config.data.tasks],
        config.train.loss_weighting,
    )
    return TrainingModel(model, loss)
