"""Per-task evaluation metrics, exact across Ray Train workers.

Binary tasks: AUC, log loss, normalised entropy (NE: log loss divided by the entropy of the
observed base rate) and calibration (mean prediction / observed rate). Regression tasks: MSE.
Rows whose label is missing (mask 0) are left out of that task's metrics.

The state lives in torchmetrics objects, which gather every worker's predictions (AUC) or
sums (the rest) through `torch.distributed` on `compute()`: the AUC is computed once over all
predictions, not averaged over per-worker AUCs.

GAUC (binary tasks with a group column, e.g. a user id): the AUC of each group's rows,
averaged with the group's number of rows (impressions) as its weight, over the groups that
hold both classes, as TorchRec's and TorchEasyRec's GAUC. Sample weights do not enter it.
It is exact across workers without gathering the split anywhere: each worker sends every
row to the worker that owns its group (`all_to_all`, owner = group key mod world size), so a
group's rows meet on one worker, which computes that group's AUC; the workers then sum the
weighted AUCs. A worker holds about 1/N of the split's (key, score, label) triples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchmetrics import SumMetric
from torchmetrics.classification import BinaryAUROC

from pipeline.config import TaskSpec
from pipeline.metrics_vocab import MEAN_METRICS, metric_name
from pipeline.ranking import binary_entropy, grouped_auc_sums


class _BinaryState:
    def __init__(self, device: torch.device) -> None:
        self.auroc = BinaryAUROC(thresholds=None).to(device)
        self.sums = {k: SumMetric().to(device) for k in ("logloss", "pred", "label", "count")}


class _GroupState:
    """This worker's (group key, score, label) rows of one task, for GAUC."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []  # [n, 2] float64: score, label

    def update(self, keys: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> None:
        self.keys.append(keys.long())
        self.values.append(torch.stack([scores.double(), labels.double()], dim=1))

    def compute(self, device: torch.device) -> tuple[float, float]:
        """(GAUC, number of groups with both classes) over every worker's rows."""
        keys = torch.cat(self.keys) if self.keys else torch.zeros(0, dtype=torch.long)
        values = torch.cat(self.values) if self.values else torch.zeros(0, 2).double()
        keys, values = _to_group_owners(keys.to(device), values.to(device))
        values = values.cpu().numpy()
        weighted, weight, groups = grouped_auc_sums(keys.cpu().numpy(), values[:, 0], values[:, 1])
        totals = torch.tensor([weighted, weight, groups], dtype=torch.float64, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        weighted, weight, groups = totals.tolist()
        return (weighted / weight if weight > 0 else float("nan")), groups


def _to_group_owners(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every worker's rows whose group this worker owns (key mod world size), from all
    workers (one `all_to_all`); unchanged outside a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys, values
    world = dist.get_world_size()
    owner = torch.remainder(keys, world)
    order = torch.argsort(owner, stable=True)
    keys, values = keys[order], values[order]
    send = torch.bincount(owner, minlength=world)
    receive = torch.empty_like(send)
    dist.all_to_all_single(receive, send)
    send_sizes, receive_sizes = send.tolist(), receive.tolist()
    out_keys = keys.new_empty(sum(receive_sizes))
    dist.all_to_all_single(out_keys, keys, receive_sizes, send_sizes)
    out_values = values.new_empty((sum(receive_sizes), values.shape[1]))
    dist.all_to_all_single(out_values, values.contiguous(), receive_sizes, send_sizes)
    return out_keys, out_values


class _RegressionState:
    def __init__(self, device: torch.device) -> None:
        self.sums = {k: SumMetric().to(device) for k in ("sq_err", "count")}


class MultiTaskMetrics:
    """Accumulates predictions for every task and computes the metrics.

    Args:
        tasks: the tasks, in the order of the model's outputs; a binary task with a
            `group_column` also gets GAUC.
        device: where the metric state lives (the model's device).

    Example:
        >>> m = MultiTaskMetrics([TaskSpec(name="click")], torch.device("cpu"))
        >>> m.update(torch.tensor([[2.0], [-2.0]]), torch.tensor([[1.0], [0.0]]), torch.ones(2, 1))
        >>> m.compute("val")["val/click/auc"]
        1.0
    """

    def __init__(self, tasks: Sequence[TaskSpec], device: torch.device) -> None:
        self.tasks = list(tasks)
        self.device = device
        self.updated = False
        self.state: list[_BinaryState | _RegressionState] = [
            _BinaryState(device) if t.type == "binary" else _RegressionState(device)
            for t in self.tasks
        ]
        self.groups = {
            i: _GroupState()
            for i, t in enumerate(self.tasks)
            if t.type == "binary" and t.group_column
        }

    @torch.no_grad()
    def update(
        self,
        outputs: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor,
        groups: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Add a batch: `outputs` are logits (binary) or values (regression), all [B, T];
        `groups` maps a group column to the rows' keys [B] (the batch's `group.<column>`),
        needed for every task with a group column."""
        self.updated = True
        outputs = outputs.float()
        for i, state in enumerate(self.state):
            keep = mask[:, i] > 0
            out, y = outputs[keep, i], labels[keep, i]
            if i in self.groups:
                column = self.tasks[i].group_column
                keys = groups[column][keep] if groups else out.new_zeros(0, dtype=torch.long)
                self.groups[i].update(keys, torch.sigmoid(out), y)
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

        Also `<prefix>/mean_auc`, `<prefix>/mean_ne` (and `mean_gauc`) over the binary
        tasks, the values early stopping and model selection use.
        """
        if not self.updated:
            # A worker whose shard of this split is empty must still take part in every
            # gather, with the same tensors as the others: feed it an empty batch.
            empty = torch.zeros(0, len(self.tasks), device=self.device)
            self.update(empty, empty, empty)
        out: dict[str, float] = {}
        for i, group in self.groups.items():  # every worker, in the same order
            gauc, count = group.compute(self.device)
            out[metric_name(prefix, self.tasks[i].name, "gauc_groups")] = count
            if count:
                out[metric_name(prefix, self.tasks[i].name, "gauc")] = gauc
        for task, state in zip(self.tasks, self.state, strict=True):
            values = _task_metrics(state)
            out.update({metric_name(prefix, task.name, k): v for k, v in values.items()})
        for kind in MEAN_METRICS:
            found = [out[k] for t in self.tasks if (k := metric_name(prefix, t.name, kind)) in out]
            if found:
                out[metric_name(prefix, None, kind)] = sum(found) / len(found)
        return out


def _task_metrics(state: _BinaryState | _RegressionState) -> dict[str, float]:
    """One task's metrics from its (gathered) state."""
    sums = {k: float(v.compute()) for k, v in state.sums.items()}
    count = sums["count"]
    if count == 0:
        return {"count": count}
    if isinstance(state, _RegressionState):
        return {"count": count, "mse": sums["sq_err"] / count}
    logloss, rate = sums["logloss"] / count, sums["label"] / count
    entropy = binary_entropy(rate)
    return {
        "count": count,
        "auc": float(state.auroc.compute()),
        "logloss": logloss,
        "ne": logloss / entropy if entropy > 0 else float("nan"),
        "calibration": (sums["pred"] / count) / rate if rate > 0 else float("nan"),
    }
