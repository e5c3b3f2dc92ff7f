"""The Ray Train callback that logs each epoch to MLflow and prints its one-line summary.

Only rank 0's metrics reach MLflow: `EpochLogger` runs on the Ray Train controller and
receives every worker's report, of which it logs rank 0's. Logging is keyed by epoch and
skips epochs already in the run, so a restart after a worker failure or a `--resume` never
logs an epoch twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlflow.tracking import MlflowClient
from ray.train import UserCallback

from pipeline.tracking.runs import EPOCH_KEY, log_metrics, logged_epochs


def format_epoch(metrics: Mapping[str, Any], tasks: list[str]) -> str:
    """One progress line: per-task AUC/NE (or MSE) and throughput."""
    parts = [f"epoch {int(metrics['epoch'])}"]
    for task in tasks:
        key = f"val/{task}"
        if f"{key}/auc" in metrics:
            parts.append(f"{task} auc={metrics[f'{key}/auc']:.4f} ne={metrics[f'{key}/ne']:.4f}")
        elif f"{key}/mse" in metrics:
            parts.append(f"{task} mse={metrics[f'{key}/mse']:.4f}")
    parts.append(f"loss={metrics.get('train/loss', float('nan')):.4f}")
    parts.append(f"{metrics.get('train/samples_per_s', 0):,.0f} samples/s")
    return " | ".join(parts)


class EpochLogger(UserCallback):
    """Logs rank 0's per-epoch report to MLflow once, and prints a progress line.

    Runs on the Ray Train controller; the final report (`final` = 1) carries test metrics
    and is logged without a step.
    """

    def __init__(self, tracking_uri: str, run_id: str, tasks: list[str]) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.tasks = tasks
        self._seen: set[int] | None = None

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        report = metrics[0]
        client = MlflowClient(self.tracking_uri)
        numeric = {k: float(v) for k, v in report.items() if isinstance(v, int | float)}
        if report.get("final"):
            summary = {k: v for k, v in numeric.items() if k not in ("final", EPOCH_KEY)}
            log_metrics(client, self.run_id, summary)
            return
        if self._seen is None:
            self._seen = logged_epochs(client, self.run_id)
        epoch = int(report["epoch"])
        if epoch in self._seen:
            return
        log_metrics(client, self.run_id, numeric, step=epoch)
        self._seen.add(epoch)
        print(format_epoch(report, self.tasks), flush=True)
