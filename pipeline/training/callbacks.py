"""The Ray Train callback that logs a training's reports to MLflow and prints each epoch's
one-line summary.

Only rank 0's metrics reach MLflow: `RunLogger` runs on the Ray Train controller and
receives every worker's report, of which it logs rank 0's, at the report's `global_step`
(the MLflow step of every metric: step metrics, validations inside an epoch, epoch ends).
Logging skips steps already in the run, so a restart after a worker failure or a
`--resume`, which repeats the steps after its checkpoint, never logs a step twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlflow.tracking import MlflowClient
from ray.train import UserCallback

from pipeline.tracking.runs import STEP_KEY, log_metrics, logged_steps


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


class RunLogger(UserCallback):
    """Logs rank 0's reports to MLflow once per global step; prints a line per epoch.

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
            drop = ("final", "epoch", STEP_KEY, "validations")
            log_metrics(client, self.run_id, {k: v for k, v in numeric.items() if k not in drop})
            return
        if self._seen is None:
            self._seen = logged_steps(client, self.run_id)
        step = int(report[STEP_KEY])
        if step in self._seen:
            return
        log_metrics(client, self.run_id, numeric, step=step)
        self._seen.add(step)
        if report.get("epoch_end"):
            print(format_epoch(report, self.tasks), flush=True)
