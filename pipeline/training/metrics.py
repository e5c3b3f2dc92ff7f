"""Per-task evaluation metrics, exact across Ray Train workers.

Binary tasks: AUC, log loss, normalised entropy (NE: log loss divided by the entropy of the
observed base rate) and calibration (mean prediction / observed rate). Regression tasks: MSE.
Rows whose label is missing (mask 0) are left out of that task's metrics.

The state lives in torchmetrics objects, which gather every worker's predictions (AUC) or
sums (the rest) through `torch.distributed` on `compute()`: the AUC is computed once over all
predictions, not averaged over per-worker AUCs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics import SumMetric
from torchmetrics.classification import BinaryAUROC


@dataclass(frozen=True)
class TaskKind:
    """A task's name and whether it is `binary` or `regression`."""

    name: str
    type: str


class _BinaryState:
    def __init__(self, device: torch.device) -> None:
        self.auroc = BinaryAUROC(thresholds=None).to(device)
        self.sums = {k: SumMetric().to(device) for k in ("logloss", "pred", "label", "count")}


class _RegressionState:
    def __init__(self, device: torch.device) -> None:
        self.sums = {k: SumMetric().to(device) for k in ("sq_err", "count")}


def binary_entropy(rate: float) -> float:
    """Entropy (nats) of a Bernoulli(rate); 0 at rate 0 or 1."""
    if rate <= 0.0 or rate >= 1.0:
        return 0.0
    return -(rate * math.log(rate) + (1.0 - rate) * math.log(1.0 - rate))


class MultiTaskMetrics:
    """Accumulates predictions for every task and computes the metrics.

    Args:
        tasks: the tasks, in the order of the model's outputs.
        device: where the metric state lives (the model's device).

    Example:
        >>> m = MultiTaskMetrics([TaskKind("click", "binary")], torch.device("cpu"))
        >>> m.update(torch.tensor([[2.0], [-2.0]]), torch.tensor([[1.0], [0.0]]), torch.ones(2, 1))
        >>> m.compute("val")["val/click/auc"]
        1.0
    """

    def __init__(self, tasks: Sequence[TaskKind], device: torch.device) -> None:
        self.tasks = list(tasks)
        self.device = device
        self.updated = False
        self.state: list[_BinaryState | _RegressionState] = [
            _BinaryState(device) if t.type == "binary" else _RegressionState(device)
            for t in self.tasks
        ]

    @torch.no_grad()
    def update(self, outputs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        """Add a batch: `outputs` are logits (binary) or values (regression), all [B, T]."""
        self.updated = True
        outputs = outputs.float()
        for i, state in enumerate(self.state):
            keep = mask[:, i] > 0
            out, y = outputs[keep, i], labels[keep, i]
            if isinstance(state, _BinaryState):
                state.auroc.update(torch.sigmoid(out), y.long())
                state.sums["logloss"].update(
                    F.binary_cross_entropy_with_logits(out, y, reduction="sum")
                )
                state.sums["pred"].update(torch.sigmoid(out).sum())
                state.sums["label"].update(y.sum())
            else:
                state.sums["sq_err"].update(((out - y) ** 2).sum())
            state.sums["count"].update(torch.tensor(float(y.numel()), device=y.device))

    def compute(self, prefix: str) -> dict[str, float]:
        """Metrics over everything seen by all workers, keyed `<prefix>/<task>/<metric>`.

        Also `<prefix>/mean_auc` and `<prefix>/mean_ne` over the binary tasks, the values
        early stopping and model selection use.
        """
        if not self.updated:
            # A worker whose shard of this split is empty must still take part in every
            # gather, with the same tensors as the others: feed it an empty batch.
            empty = torch.zeros(0, len(self.tasks), device=self.device)
            self.update(empty, empty, empty)
        out: dict[str, float] = {}
        aucs, nes = [], []
        for task, state in zip(self.tasks, self.state, strict=True):
            sums = {k: float(v.compute()) for k, v in state.sums.items()}
            count = sums["count"]
            key = f"{prefix}/{task.name}"
            out[f"{key}/count"] = count
            if count == 0:
                continue
            if isinstance(state, _BinaryState):
                logloss = sums["logloss"] / count
                rate = sums["label"] / count
                entropy = binary_entropy(rate)
                auc = float(state.auroc.compute())
                out[f"{key}/auc"] = auc
                out[f"{key}/logloss"] = logloss
                out[f"{key}/ne"] = logloss / entropy if entropy > 0 else float("nan")
                out[f"{key}/calibration"] = (
                    (sums["pred"] / count) / rate if rate > 0 else float("nan")
                )
                aucs.append(auc)
                nes.append(out[f"{key}/ne"])
            else:
                out[f"{key}/mse"] = sums["sq_err"] / count
        if aucs:
            out[f"{prefix}/mean_auc"] = sum(aucs) / len(aucs)
            out[f"{prefix}/mean_ne"] = sum(nes) / len(nes)
        return out
