"""`adatt register`: put a run's scoring model into the MLflow registry, tagged with what it
was trained on, and move an alias (e.g. `champion`) to it, optionally only if it is better.

A run of `adatt train` and the best trial of `adatt tune` (a child run) are the same thing
here: a run id whose run logged the scoring model `model` (`pipeline/serving/scoring.py`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import InputError
from pipeline.serving.scoring import MODEL_NAME, read_spec
from pipeline.tracking import tags as tag

# Metrics where lower is better; the other quality metrics (auc) are maximised.
LOWER_IS_BETTER = ("ne", "logloss", "loss", "mse")
# Not a quality: calibration is best at 1, count and gauc_groups are counts.
NOT_COMPARABLE = ("calibration", "count", "gauc_groups")


@dataclass
class Registration:
    """The outcome of a registration.

    Attributes:
        name, version: the registered model and its new version.
        alias: the alias considered (None: registered only).
        promoted: whether the alias now points at the new version.
        holder: the version the alias points at afterwards (None without an alias).
        message: one line saying what happened and, with a comparison, which version won.
    """

    name: str
    version: str
    alias: str | None
    promoted: bool
    holder: str | None
    message: str


def schema_hash(data: dict) -> str:
    """A short hash of the raw inputs and outputs a model expects: its feature columns (with
    hashing buckets and dense transforms) and tasks.

    Args:
        data: the `data:` config section (as JSON) the model was trained with.
    """
    keys = ("categorical", "dense", "multi_hot")
    schema: dict = {k: data.get(k) for k in keys}
    # A task's output, not how it is trained or evaluated (loss weight, oracle, GAUC group).
    schema["tasks"] = [
        {"name": t["name"], "label": t.get("label") or t["name"], "type": t.get("type", "binary")}
        for t in data.get("tasks", [])
    ]
    blob = json.dumps(schema, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _kind(metric: str) -> str:
    """`val/click/auc` -> `auc`; `val/mean_ne` -> `ne`."""
    return metric.rsplit("/", 1)[-1].removeprefix("mean_")


def lower_is_better(metric: str) -> bool:
    """Whether `metric` improves downwards (NE, log loss, MSE)."""
    return _kind(metric) in LOWER_IS_BETTER


def beats(new: float, old: float | None, metric: str) -> bool:
    """Whether `new` is strictly better than `old` on `metric`; any value beats a missing one."""
    if old is None:
        return True
    return new < old if lower_is_better(metric) else new > old


def check_metric(metric: str) -> None:
    """A promotion metric must be a validation quality: `val/...` or `best/val/...`."""
    if not metric.startswith(("val/", "best/val/")):
        raise InputError(
            f"--promote-if-better {metric}: use a validation metric (val/...); test metrics "
            "stay out of model selection"
        )
    if _kind(metric) in NOT_COMPARABLE:
        raise InputError(f"--promote-if-better {metric}: not a metric that ranks models")


def validation_metric(metrics: dict[str, float], metric: str) -> float | None:
    """A run's value of `metric` for its logged model.

    `best/<metric>` comes first: the logged model is the selected epoch's, while `val/...`
    without the prefix holds the last epoch's value.
    """
    for key in (f"best/{metric}", metric):
        if key in metrics:
            return metrics[key]
    return None


def _logged_model(client: MlflowClient, run_id: str, experiment_id: str):
    found = client.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
    )
    if not found:
        raise InputError(f"--run {run_id}: the run has no logged model '{MODEL_NAME}'")
    return found[0]


def _alias_holder(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def register_run(
    client: MlflowClient,
    run_id: str,
    name: str,
    alias: str | None = "champion",
    promote_if_better: str | None = None,
) -> Registration:
    """Register run `run_id`'s scoring model as a new version of `name`; move `alias` to it.

    The version is tagged with `data_schema_hash`, `git_commit`, `model_family`, `run_id`
    and the run's `best/val/...` and `test/...` metrics.

    Args:
        client: a client of the tracking server that holds the run and the registry.
        run_id: an `adatt train` run, or the best trial's (child) run of an `adatt tune`.
        name: the registered model name (created on first use).
        alias: the alias to move (None: register only).
        promote_if_better: a validation metric (e.g. `val/mean_auc`); the alias moves only if
            the new version beats the current holder on it (ties keep the holder).

    Example:
        >>> register_run(client, run_id, "adatt", "champion", "val/mean_auc").message
        ... # doctest: +SKIP
        'registered adatt version 2 (run 5f2e...); val/mean_auc: new version 2 = 0.712 vs
        @champion version 1 = 0.695 (higher is better); version 2 wins, @champion -> 2'
    """
    if promote_if_better:
        check_metric(promote_if_better)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise InputError(f"--run {run_id}: no such MLflow run") from None
    model = _logged_model(client, run_id, run.info.experiment_id)
    metrics = run.data.metrics
    new_value = None
    if promote_if_better:
        new_value = validation_metric(metrics, promote_if_better)
        if new_value is None:
            raise InputError(
                f"--promote-if-better {promote_if_better}: run {run_id} has no such metric"
            )
    spec = read_spec(model.model_uri)
    tags = {
        tag.VERSION_SCHEMA_HASH: schema_hash(spec["preprocessor"]["data"]),
        tag.VERSION_GIT_COMMIT: run.data.tags.get(tag.GIT_COMMIT, "unknown"),
        tag.VERSION_MODEL_FAMILY: run.data.tags.get(
            tag.MODEL, spec["model"].get("name", "unknown")
        ),
        tag.VERSION_RUN_ID: run_id,
        **{k: f"{v:.6g}" for k, v in metrics.items() if k.startswith(("best/val/", "test/"))},
    }
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(
        name, model.model_uri, run_id=run_id, tags=tags, model_id=model.model_id
    ).version
    registered = f"registered {name} version {version} (run {run_id})"
    if alias is None:
        return Registration(name, version, None, False, None, registered)

    current = _alias_holder(client, name, alias) if promote_if_better else None
    if current is None:
        client.set_registered_model_alias(name, alias, version)
        return Registration(
            name, version, alias, True, version, f"{registered}; @{alias} -> {version}"
        )

    old_value = validation_metric(client.get_run(current.run_id).data.metrics, promote_if_better)
    better = beats(new_value, old_value, promote_if_better)
    shown_old = "n/a" if old_value is None else f"{old_value:.6g}"
    verdict = (
        f"{promote_if_better}: new version {version} = {new_value:.6g} vs @{alias} version "
        f"{current.version} = {shown_old} ({'lower' if lower_is_better(promote_if_better) else 'higher'} is better)"
    )
    if not better:
        message = f"{registered}; {verdict}; version {current.version} wins, @{alias} stays"
        return Registration(name, version, alias, False, current.version, message)
    client.set_registered_model_alias(name, alias, version)
    message = f"{registered}; {verdict}; version {version} wins, @{alias} -> {version}"
    return Registration(name, version, alias, True, version, message)
