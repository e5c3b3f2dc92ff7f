"""What a search reports: one row per trial, the summary table, and the parent run's outputs
(best config as params and `best_config.yaml`, a scatter plot of the search, the table)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from pipeline.config import Config
from pipeline.tracking.runs import log_metrics, log_params
from tune.space import SearchSpec
from tune.trial import find_trial_run


@dataclass
class TrialRow:
    """One trial as the search saw it.

    `status`: `completed` (all epochs, selected model reported), `stopped` (by the scheduler),
    `error`, or `unfinished` (interrupted search). `epochs` and `validations` are those of
    the last report Tune saw (a trial stopped inside its first epoch: 0 epochs). `value` is
    the search metric of the last report: for a completed trial, its selected model's.
    """

    trial_id: str
    run_id: str | None
    status: str
    epochs: int
    validations: int
    value: float | None
    values: dict[str, Any]
    checkpoint_path: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def trial_rows(
    results: Any,
    spec: SearchSpec,
    client: MlflowClient,
    experiment_id: str,
    parent_run_id: str,
    interrupted: bool = False,
) -> list[TrialRow]:
    """Rows from a Ray Tune `ResultGrid`, each joined to its MLflow run."""
    rows = []
    for result in results:
        metrics = dict(result.metrics or {})
        # A trial that never reported has no trial_id yet: its folder name carries it.
        trial_id = metrics.get("trial_id") or _trial_id_from_path(str(result.path))
        if result.error is not None:
            status = "error"
        elif metrics.get("final"):
            status = "completed"
        elif interrupted:
            status = "unfinished"
        else:
            status = "stopped"
        value = metrics.get(spec.settings.metric)
        rows.append(
            TrialRow(
                trial_id=trial_id,
                run_id=find_trial_run(client, experiment_id, parent_run_id, trial_id),
                status=status,
                epochs=int(metrics.get("epoch", 0)),
                validations=int(metrics.get("validations", 0)),
                value=float(value) if isinstance(value, int | float) else None,
                values=spec.decode(result.config) if result.config else {},
                checkpoint_path=metrics.get("checkpoint_path"),
                metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
            )
        )
    return rows


def _trial_id_from_path(path: str) -> str:
    """`.../run_trial_8b625_00003_3_train_lr=...` -> `8b625_00003`."""
    found = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(path).name)
    return found.group(1) if found else Path(path).name


def _ranked(rows: list[TrialRow], spec: SearchSpec) -> list[TrialRow]:
    sign = -1 if spec.settings.direction == "max" else 1

    def key(row: TrialRow) -> tuple[int, float]:
        # Completed trials first, then stopped ones, each by the metric; errors last.
        order = {"completed": 0, "stopped": 1, "unfinished": 2}.get(row.status, 3)
        return order, sign * row.value if row.value is not None else math.inf

    return sorted(rows, key=key)


def summary_table(rows: list[TrialRow], spec: SearchSpec) -> list[str]:
    """The top `tune.top` trials as text lines, best first.

    Example:
        >>> print("\\n".join(summary_table(rows, spec)))  # doctest: +SKIP
        rank trial       status     epochs validations val/mean_auc model.expert_dims ...
           1 3f2a_00002  completed       3           3       0.7312 [64, 32]          ...
    """
    table = [
        {
            "rank": i + 1,
            "trial": row.trial_id,
            "status": row.status,
            "epochs": row.epochs,
            "validations": row.validations,
            spec.settings.metric: f"{row.value:.4f}" if row.value is not None else "-",
            **{k: json.dumps(v) if isinstance(v, list) else _fmt(v) for k, v in row.values.items()},
        }
        for i, row in enumerate(_ranked(rows, spec)[: spec.settings.top])
    ]
    return pd.DataFrame(table).to_string(index=False).splitlines()


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def search_plot(rows: list[TrialRow], spec: SearchSpec, best: TrialRow) -> Figure:
    """One scatter per searched field: its value against the trial's metric.

    Completed trials are dots, trials stopped early crosses, the best a star; listed values
    (choice, grid) sit at their position in the list.
    """
    fields = list(spec.space)
    # matplotlib's object API: no pyplot, so no display backend and no global figure state.
    fig = Figure(figsize=(3.2 * len(fields), 3.2))
    axes = fig.subplots(1, len(fields), squeeze=False)
    scored = [r for r in rows if r.value is not None]
    for ax, path in zip(axes[0], fields, strict=True):
        dist = spec.space[path]
        labels = [json.dumps(v) for v in dist.values] if dist.values is not None else None

        def position(value: Any, labels: list[str] | None = labels) -> float:
            return labels.index(json.dumps(value)) if labels is not None else float(value)

        for status, marker in (("completed", "o"), ("stopped", "x")):
            points = [r for r in scored if r.status == status]
            ax.scatter(
                [position(r.values[path]) for r in points],
                [r.value for r in points],
                marker=marker,
                label=status,
                alpha=0.8,
            )
        if best.value is not None:
            ax.scatter(
                [position(best.values[path])],
                [best.value],
                marker="*",
                s=200,
                color="gold",
                edgecolor="black",
                label="best",
                zorder=3,
            )
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        elif dist.loguniform is not None:
            ax.set_xscale("log")
        ax.set_xlabel(path, fontsize=8)
        ax.set_ylabel(spec.settings.metric, fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"search {spec.name}: {len(scored)} trials")
    fig.tight_layout()
    return fig


def log_search_outputs(
    client: MlflowClient,
    parent_run_id: str,
    spec: SearchSpec,
    rows: list[TrialRow],
    best: TrialRow,
    best_config: Config,
) -> None:
    """Best config (`best.<field>` params, `best_config.yaml`), plot and table on the parent."""
    params = {f"best.{k}": json.dumps(v) for k, v in best.values.items()}
    log_params(client, parent_run_id, {**params, "best.trial_id": best.trial_id})
    metrics = {
        f"best/{spec.settings.metric}": float(best.value),
        "search/trials": float(len(rows)),
        "search/stopped_early": float(sum(r.status == "stopped" for r in rows)),
        "search/errors": float(sum(r.status == "error" for r in rows)),
    }
    log_metrics(client, parent_run_id, metrics)
    client.log_dict(parent_run_id, best_config.model_dump(mode="json"), "best_config.yaml")
    client.log_figure(parent_run_id, search_plot(rows, spec, best), "search.png")
    client.log_text(parent_run_id, "\n".join(summary_table(rows, spec)), "summary.txt")
