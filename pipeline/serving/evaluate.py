"""`adatt evaluate`: champion against challengers on the same holdout rows.

Ray Data scores every row with every model (a pool of actors, each loading every model
once), and keeps, per task, the observed rows' group key, label and each model's score.
Those columns come to the driver (8 bytes a value: for 10M rows, 3 tasks and 2 models
about 1.2 GB), where each model gets per task AUC, GAUC (each group's AUC weighted by its
rows, as in training) and NE (binary tasks), or MSE (regression), plus their means over the
binary tasks.

Confidence intervals come from a paired bootstrap by group: each replicate draws a
Poisson(1) count per group (user), weights that group's rows with it, and recomputes every
metric of every model from the same counts. A challenger's gain over the first model (the
champion) is computed within each replicate, so the interval of the gain accounts for
both models being scored on the same users. Intervals are the 2.5 and 97.5 percentiles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import ray
from mlflow.tracking import MlflowClient

from pipeline.config import SplitConfig
from pipeline.data.hashing import group_keys
from pipeline.data.preprocess import as_float
from pipeline.data.split import split_mask
from pipeline.data.validate import check_schema
from pipeline.errors import InputError
from pipeline.ranking import binary_entropy, per_group_auc, score_blocks, weighted_auc
from pipeline.runtime import init_ray
from pipeline.serving.predict import ModelSpec, load_spec
from pipeline.serving.registry import lower_is_better
from pipeline.serving.scoring import load_scoring_model
from pipeline.tracking.runs import ensure_experiment, log_metrics, log_params, run_lifecycle

EXPERIMENT = "adatt-evaluation"


@dataclass
class Estimate:
    """A metric's value on the holdout and its 95 % bootstrap interval."""

    value: float
    low: float
    high: float


@dataclass
class Evaluation:
    """What `evaluate` measured.

    Attributes:
        models: the model URIs, the first being the one the others are compared with.
        rows: holdout rows scored.
        metrics: per model index, `<task>/<metric>` or `mean_<metric>` -> estimate.
        gains: per challenger index (1, 2, ...), the same keys -> its value minus the
            first model's, with the paired interval.
        run_id: the MLflow run holding the comparison.
    """

    models: list[str]
    rows: int
    metrics: dict[int, dict[str, Estimate]]
    gains: dict[int, dict[str, Estimate]] = field(default_factory=dict)
    run_id: str | None = None


class _TaskRows:
    """One task's observed rows: what every replicate's metrics are computed from."""

    def __init__(
        self, kind: str, group_of_row: np.ndarray, labels: np.ndarray, scores: np.ndarray
    ) -> None:
        self.kind = kind
        self.labels = labels
        self.scores = scores  # [models, rows]
        self.group_of_row = group_of_row  # each row's group index, shared by every task
        if kind != "binary":
            return
        self.sorted = [score_blocks(s) for s in scores]
        clipped = np.clip(scores, 1e-7, 1 - 1e-7)
        self.logloss = -(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped))
        # Per model: (index of each group with both classes, its AUC, its rows).
        index = self.group_of_row
        self.groups = []
        for s in scores:
            kept, auc, size = per_group_auc(index, s, labels)
            self.groups.append((kept, auc, size))

    def metrics(self, model: int, counts: np.ndarray) -> dict[str, float]:
        """This model's metrics with each group's rows weighted by `counts[group]`."""
        w = counts[self.group_of_row].astype(np.float64)
        total = w.sum()
        if total == 0:
            return {}
        if self.kind != "binary":
            return {"mse": float((w * (self.scores[model] - self.labels) ** 2).sum() / total)}
        kept, auc, size = self.groups[model]
        group_weight = counts[kept] * size
        order, blocks = self.sorted[model]
        rate = float((w * self.labels).sum() / total)
        entropy = binary_entropy(rate)
        logloss = float((w * self.logloss[model]).sum() / total)
        return {
            "auc": weighted_auc(order, blocks, self.labels, w),
            "gauc": float((group_weight * auc).sum() / group_weight.sum())
            if group_weight.sum() > 0
            else np.nan,
            "ne": logloss / entropy if entropy > 0 else np.nan,
        }


class _MultiScorer:
    """A Ray Data actor: loads every model once; per batch, each model's scores."""

    def __init__(self, model_uris: list[str], tracking_uri: str, columns: dict[str, Any]):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mlflow.set_tracking_uri(tracking_uri)
        self.models = [load_scoring_model(uri) for uri in model_uris]
        self.columns = columns

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        split = self.columns.get("split")
        if split is not None:  # only the rows of one split (e.g. a day's test rows)
            config, name = split
            batch = batch[split_mask(batch[config.column], config, name)]
        out = {"group": group_keys(batch[self.columns["group"]])}
        for task, label in self.columns["labels"].items():
            out[f"label.{task}"] = as_float(batch[label])
        for i, (model, features) in enumerate(
            zip(self.models, self.columns["features"], strict=True)
        ):
            if len(batch) == 0:  # every row in another split: nothing to score
                scores = pd.DataFrame({t: np.zeros(0) for t in self.columns["labels"]})
            else:
                scores = model.predict(batch[features])
            for task in self.columns["labels"]:
                out[f"score.{i}.{task}"] = scores[task].to_numpy(np.float64)
        return out


def _check_models(specs: list[ModelSpec], uris: list[str]) -> None:
    first = specs[0]
    for uri, spec in zip(uris[1:], specs[1:], strict=True):
        if spec.tasks != first.tasks:
            raise InputError(
                f"--model {uri}: tasks {spec.tasks} differ from {uris[0]}'s {first.tasks}; "
                "models are compared task by task"
            )


def _summary(replicates: list[dict[str, float]]) -> dict[str, Estimate]:
    """The point value (replicate 0) and the 2.5 / 97.5 percentiles of the others."""
    out = {}
    for key, value in replicates[0].items():
        draws = np.array([r.get(key, np.nan) for r in replicates[1:]], dtype=np.float64)
        draws = draws[np.isfinite(draws)]
        low, high = np.percentile(draws, [2.5, 97.5]) if len(draws) else (np.nan, np.nan)
        out[key] = Estimate(float(value), float(low), float(high))
    return out


def _with_means(values: dict[str, float]) -> dict[str, float]:
    for kind in ("auc", "gauc", "ne"):
        found = [v for k, v in values.items() if k.endswith(f"/{kind}") and np.isfinite(v)]
        if found:
            values[f"mean_{kind}"] = float(np.mean(found))
    return values


def evaluate(
    model_uris: Sequence[str],
    data_path: str | list[str],
    tracking_uri: str,
    group_column: str | None = None,
    bootstrap: int = 200,
    seed: int = 0,
    batch_size: int = 4096,
    experiment: str = EXPERIMENT,
    split: tuple[SplitConfig, str] | None = None,
) -> Evaluation:
    """Score `data_path` with every model and compare them with the first (see module doc).

    Args:
        model_uris: two or more model URIs; the first is the reference (the champion).
        data_path: holdout Parquet logs with the label columns (and the group column).
        tracking_uri: the MLflow server holding the models; the comparison is logged there.
        group_column: the GAUC and bootstrap groups; default the first model's
            `data.group_column`.
        bootstrap: replicates for the intervals (at least 20).
        seed: seed of the replicates' group counts.
        batch_size: rows per scoring call.
        experiment: the MLflow experiment of the comparison run.
        split: evaluate only the rows of this split of `data_path` (config, name), e.g. the
            test rows of a day that `adatt retrain` trained on.

    Raises:
        InputError: before scoring, when a model cannot be read, the models' tasks differ,
            there is no group column, or a column is missing from the data.
    """
    uris = list(model_uris)
    if len(uris) < 2:
        raise InputError("--model: give at least two models (the first is the champion)")
    if bootstrap < 20:
        raise InputError(f"--bootstrap {bootstrap}: at least 20 replicates for 95 % intervals")
    mlflow.set_tracking_uri(tracking_uri)
    specs = [load_spec(uri) for uri in uris]
    _check_models(specs, uris)
    data = specs[0].data
    group = group_column or data.group_column
    if not group:
        raise InputError(
            f"--group-column: {uris[0]} has no data.group_column; name the column of users"
        )
    labels = {t.name: t.label_column for t in data.tasks}
    kinds = {t.name: t.type for t in data.tasks}
    features = [s.data.feature_columns for s in specs]
    columns = [c for f in features for c in f] + [*labels.values(), group]
    columns = list(dict.fromkeys(columns + ([split[0].column] if split else [])))
    checked = data.model_copy(
        update={"path": data_path, "passthrough": columns, "group_column": None}
    )
    files = check_schema(checked, labels=False)

    init_ray()
    scored = (
        ray.data.read_parquet(files.paths)
        .select_columns(columns)
        .map_batches(
            _MultiScorer,
            fn_constructor_args=(
                uris,
                tracking_uri,
                {"group": group, "labels": labels, "features": features, "split": split},
            ),
            batch_size=batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=1),
        )
    )
    parts: dict[str, list[np.ndarray]] = {}
    for batch in scored.iter_batches(batch_format="numpy", batch_size=None):
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    rows = len(arrays.get("group", []))

    if rows == 0:
        raise InputError(f"--data {data_path}: no rows to evaluate on")
    distinct, group_of_row = np.unique(arrays["group"], return_inverse=True)
    n_groups = len(distinct)
    tasks = {}
    for task in labels:
        y = arrays[f"label.{task}"]
        seen = np.isfinite(y)
        scores = np.stack([arrays[f"score.{i}.{task}"][seen] for i in range(len(uris))])
        tasks[task] = _TaskRows(kinds[task], group_of_row[seen], y[seen], scores)
    # One Poisson(1) count per group and replicate, shared by every task and model: a
    # replicate resamples users, and the models are compared on the same resample.
    rng = np.random.default_rng(seed)
    per_model: list[list[dict[str, float]]] = [[] for _ in uris]
    for replicate in range(bootstrap + 1):
        counts = np.ones(n_groups) if replicate == 0 else rng.poisson(1.0, n_groups)
        for i in range(len(uris)):
            values = {}
            for task, task_rows in tasks.items():
                for key, value in task_rows.metrics(i, counts).items():
                    values[f"{task}/{key}"] = value
            per_model[i].append(_with_means(values))
    result = Evaluation(uris, rows, {i: _summary(r) for i, r in enumerate(per_model)})
    for i in range(1, len(uris)):
        gains = [
            {k: v - base[k] for k, v in mine.items() if k in base}
            for mine, base in zip(per_model[i], per_model[0], strict=True)
        ]
        result.gains[i] = _summary(gains)
    result.run_id = _log(result, data_path, group, bootstrap, seed, n_groups, experiment)
    return result


def _log(
    result: Evaluation,
    data_path: Any,
    group: str,
    bootstrap: int,
    seed: int,
    groups: int,
    experiment: str,
) -> str:
    """One MLflow run with the comparison: params, metrics, `evaluation.json`."""
    uri = mlflow.get_tracking_uri()
    client = MlflowClient(uri)
    run_id = client.create_run(ensure_experiment(client, experiment, uri), run_name="evaluate")
    run_id = run_id.info.run_id
    with run_lifecycle(client, run_id):
        params = {f"model.{i}": model for i, model in enumerate(result.models)}
        params.update(
            data=json.dumps(data_path), group_column=group, bootstrap=bootstrap, seed=seed
        )
        log_params(client, run_id, params)
        metrics = {"rows": float(result.rows), "groups": float(groups)}
        named = [(str(i), v) for i, v in result.metrics.items()]
        named += [(f"gain.{i}", v) for i, v in result.gains.items()]
        for prefix, values in named:
            for key, e in values.items():
                metrics[f"{prefix}/{key}"] = e.value
                metrics[f"{prefix}/{key}/low"] = e.low
                metrics[f"{prefix}/{key}/high"] = e.high
        log_metrics(client, run_id, {k: v for k, v in metrics.items() if np.isfinite(v)})
        client.log_dict(run_id, _as_json(result), "evaluation.json")
    return run_id


def _as_json(result: Evaluation) -> dict[str, Any]:
    def table(values: dict[str, Estimate]) -> dict[str, list[float]]:
        return {k: [e.value, e.low, e.high] for k, e in values.items()}

    return {
        "models": result.models,
        "rows": result.rows,
        "metrics": {str(i): table(v) for i, v in result.metrics.items()},
        "gains": {str(i): table(v) for i, v in result.gains.items()},
    }


def report_lines(result: Evaluation) -> list[str]:
    """The table `adatt evaluate` prints: each metric per model, and each gain, with 95 %
    intervals; `better` marks a gain whose interval excludes 0 in the good direction."""
    lines = [f"{result.rows:,} rows; [95 % bootstrap interval by group]"]
    for i, uri in enumerate(result.models):
        lines.append(f"  model {i}: {uri}" + (" (reference)" if i == 0 else ""))
    for key in result.metrics[0]:
        cells = [f"{key:<22}"]
        for i in result.metrics:
            e = result.metrics[i][key]
            cells.append(f"{e.value:.4f} [{e.low:.4f}, {e.high:.4f}]")
        for i, gains in result.gains.items():
            g = gains.get(key)
            if g is None:
                continue
            down = lower_is_better(key)
            better = g.high < 0 if down else g.low > 0
            cells.append(
                f"gain {i} {g.value:+.4f} [{g.low:+.4f}, {g.high:+.4f}]"
                + (" better" if better else "")
            )
        lines.append("  " + "  ".join(cells))
    return lines
