"""`adatt register`: put a run's scoring model into the MLflow registry, tagged with what it
was trained on, and move an alias (e.g. `champion`) to it, optionally only if it is better.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import InputError
from pipeline.serving import MODEL_NAME

# Metrics where lower is better; any other metric is maximised.
LOWER_IS_BETTER = ("ne", "logloss", "loss", "mse")


@dataclass
class Registration:
    """The outcome of a registration."""

    name: str
    version: str
    alias: str | None
    promoted: bool
    message: str


def schema_hash(config: dict) -> str:
    """A short hash of the data schema a model expects (features, tasks, hashing buckets)."""
    data = config.get("data", {})
    keys = ("categorical", "dense", "multi_hot", "tasks")
    blob = json.dumps({k: data.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _validation_metric(metrics: dict[str, float], name: str) -> float | None:
    """A run's value of `name`; `val/...` falls back to the selected epoch's `best/val/...`."""
    for key in (name, f"best/{name}"):
        if key in metrics:
            return metrics[key]
    return None


def lower_is_better(metric: str) -> bool:
    """Whether `metric` improves downwards (NE, log loss, MSE)."""
    return metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER


def register_run(
    client: MlflowClient,
    run_id: str,
    name: str,
    alias: str | None = "champion",
    promote_if_better: str | None = None,
) -> Registration:
    """Register run `run_id`'s model as a new version of `name` and move `alias` to it.

    Args:
        client: a client of the tracking server that holds the run and the registry.
        run_id: an `adatt train` run, or the best trial's run of an `adatt tune` search.
        name: the registered model name.
        alias: the alias to move (None: register only).
        promote_if_better: a validation metric (e.g. `val/mean_auc`); the alias moves only if
            the new version beats the current holder on it.
    """
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise InputError(f"--run {run_id}: no such MLflow run") from None
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'",
    )
    if not models:
        raise InputError(f"--run {run_id}: the run has no logged model '{MODEL_NAME}'")
    metrics = run.data.metrics
    new_value = None
    if promote_if_better:
        new_value = _validation_metric(metrics, promote_if_better)
        if new_value is None:
            raise InputError(
                f"--promote-if-better {promote_if_better}: run {run_id} has no such metric"
            )
    config = mlflow.artifacts.load_dict(f"runs:/{run_id}/config.yaml")
    tags = {
        "data_schema_hash": schema_hash(config),
        "git_commit": run.data.tags.get("adatt.git_commit", "unknown"),
        "model_family": run.data.tags.get("adatt.model", "unknown"),
        **{k: f"{v:.6g}" for k, v in metrics.items() if k.startswith(("best/val/", "test/"))},
    }
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(
        name, models[0].model_uri, run_id=run_id, tags=tags, model_id=models[0].model_id
    ).version
    if alias is None:
        return Registration(name, version, None, False, f"registered {name} version {version}")

    promoted, message = True, f"registered {name} version {version} as @{alias}"
    if promote_if_better:
        current = _alias_holder(client, name, alias)
        if current is not None:
            old_value = _validation_metric(
                client.get_run(current.run_id).data.metrics, promote_if_better
            )
            better = old_value is None or (
                new_value < old_value
                if lower_is_better(promote_if_better)
                else new_value > old_value
            )
            verdict = (
                f"{promote_if_better}: new version {version} = {new_value:.6g}, "
                f"@{alias} version {current.version} = {old_value}"
            )
            if not better:
                return Registration(
                    name,
                    version,
                    alias,
                    False,
                    f"{verdict}; @{alias} stays on version {current.version}",
                )
            message = f"{verdict}; @{alias} moves to version {version}"
    client.set_registered_model_alias(name, alias, version)
    return Registration(name, version, alias, promoted, message)


def _alias_holder(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
