"""`adatt register`: put a run's scoring model into the MLflow registry, tagged with what it
was trained on, and move an alias (e.g. `champion`) to it, optionally only if it is better.

A run of `adatt train` and the best trial of `adatt tune` (a child run) are the same thing
here: a run id whose run logged the scoring model `model` (`pipeline/serving/scoring.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import SplitConfig
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
    blob = json.dumps(schema_fields(data), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def schema_fields(data: dict) -> dict:
    """What `schema_hash` covers: the feature sections, and each task's output (name, label
    column, type), not how it is trained or evaluated (loss weight, oracle, GAUC group)."""
    schema: dict = {k: data.get(k) for k in ("categorical", "dense", "multi_hot")}
    schema["tasks"] = [
        {"name": t["name"], "label": t.get("label") or t["name"], "type": t.get("type", "binary")}
        for t in data.get("tasks", [])
    ]
    return schema


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


LOCK_SUFFIX = ".promotion-lock"
LOCK_OWNER, LOCK_SINCE = "owner", "since"


@contextlib.contextmanager
def promotion_lock(
    client: MlflowClient, name: str, timeout_s: float = 1800.0, stale_after_s: float = 3600.0
) -> Iterator[None]:
    """Hold the one promotion of `name` that may run at a time, for the whole compare-and-move.

    The lock is a registered model named `<name>.promotion-lock`: the registry refuses to
    create a name twice (a unique key in its database), so of two racing registrations one
    creates it and the other waits until it is deleted. A lock older than `stale_after_s`
    (its holder died) is removed. InputError after `timeout_s` of waiting.
    """
    lock = f"{name}{LOCK_SUFFIX}"
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={LOCK_OWNER: owner, LOCK_SINCE: f"{time.time():.3f}"},
                description=f"held while a registration compares and moves aliases of {name}",
            )
            break
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        _remove_if_stale(client, lock, stale_after_s)
        if time.monotonic() > deadline:
            raise InputError(
                f"--name {name}: another registration has held {lock} for over "
                f"{timeout_s:.0f} s; if no registration is running, delete that model"
            )
        time.sleep(0.5)
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def _remove_if_stale(client: MlflowClient, lock: str, stale_after_s: float) -> None:
    try:
        since = float(client.get_registered_model(lock).tags.get(LOCK_SINCE, "inf"))
    except MlflowException:  # released meanwhile
        return
    if time.time() - since > stale_after_s:
        print(f"removing {lock}, held for over {stale_after_s:.0f} s", file=sys.stderr)
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock)


def evidence_metric(metric: str) -> str:
    """`val/mean_gauc` or `mean_gauc` -> `mean_gauc`: the key `adatt evaluate` reports.
    InputError unless it is AUC, GAUC, NE or MSE of a task or a mean of them."""
    key = metric.removeprefix("best/").removeprefix("val/")
    kind = key.rsplit("/", 1)[-1].removeprefix("mean_")
    if kind not in ("auc", "gauc", "ne", "mse") or key.count("/") > 1:
        raise InputError(
            f"--promote-if-better {metric}: with --data, use a metric `adatt evaluate` "
            "reports: mean_auc, mean_gauc, mean_ne or <task>/<auc|gauc|ne|mse>"
        )
    return key


@dataclass
class Evidence:
    """How to decide a promotion from a comparison on a holdout (`adatt evaluate`)."""

    data: str | list[str]
    min_gain: float = 0.0
    group_column: str | None = None
    bootstrap: int = 200
    split: tuple[SplitConfig, str] | None = None  # only these rows of `data`


def register_run(
    client: MlflowClient,
    run_id: str,
    name: str,
    alias: str | None = "champion",
    promote_if_better: str | None = None,
    evidence: Evidence | None = None,
) -> Registration:
    """Register run `run_id`'s scoring model as a new version of `name`; move `alias` to it.

    The version is tagged with `data_schema_hash`, `git_commit`, `model_family`, `run_id`
    and the run's `best/val/...` and `test/...` metrics. With `promote_if_better`, the
    comparison with the alias holder and the move happen under `promotion_lock`, so racing
    registrations compare one after another, each with the holder the previous one left.

    Args:
        client: a client of the tracking server that holds the run and the registry.
        run_id: an `adatt train` run, or the best trial's (child) run of an `adatt tune`.
        name: the registered model name (created on first use).
        alias: the alias to move (None: register only).
        promote_if_better: a validation metric (e.g. `val/mean_auc`); the alias moves only if
            the new version beats the current holder on it (ties keep the holder).
        evidence: compare on a holdout instead of the runs' own metrics: both versions are
            scored on `evidence.data` and the alias moves only when the lower end of the
            new version's gain interval is above `evidence.min_gain` (the upper end below
            `-min_gain` for NE and MSE); the evidence becomes `promotion.*` version tags.

    Example:
        >>> register_run(client, run_id, "adatt", "champion", "val/mean_auc").message
        ... # doctest: +SKIP
        'registered adatt version 2 (run 5f2e...); val/mean_auc: new version 2 = 0.712 vs
        @champion version 1 = 0.695 (higher is better); version 2 wins, @champion -> 2'
    """
    if evidence is not None:
        if not promote_if_better:
            raise InputError("--data/--min-gain: give the metric with --promote-if-better")
        evidence_metric(promote_if_better)
    elif promote_if_better:
        check_metric(promote_if_better)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise InputError(f"--run {run_id}: no such MLflow run") from None
    model = _logged_model(client, run_id, run.info.experiment_id)
    metrics = run.data.metrics
    new_value = None
    if promote_if_better and evidence is None:
        new_value = validation_metric(metrics, promote_if_better)
        if new_value is None:
            raise InputError(
                f"--promote-if-better {promote_if_better}: run {run_id} has no such metric"
            )
    spec = read_spec(model.model_uri, client.tracking_uri)
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
        with contextlib.suppress(MlflowException):  # a racing registration created it
            client.create_registered_model(name)
    version = client.create_model_version(
        name, model.model_uri, run_id=run_id, tags=tags, model_id=model.model_id
    ).version
    registered = f"registered {name} version {version} (run {run_id})"
    if alias is None:
        return Registration(name, version, None, False, None, registered)
    if not promote_if_better:
        client.set_registered_model_alias(name, alias, version)
        return Registration(
            name, version, alias, True, version, f"{registered}; @{alias} -> {version}"
        )
    with promotion_lock(client, name):
        current = _alias_holder(client, name, alias)
        if current is None:
            client.set_registered_model_alias(name, alias, version)
            if evidence is not None:
                client.set_model_version_tag(name, version, tag.PROMOTION_DECISION, "no holder")
            message = f"{registered}; @{alias} -> {version}"
            return Registration(name, version, alias, True, version, message)
        if evidence is not None:
            better, verdict = _compare_on_holdout(
                client, name, version, current.version, promote_if_better, evidence
            )
        else:
            better, verdict = _compare_runs(
                client, current, version, new_value, promote_if_better, alias
            )
        if not better:
            message = f"{registered}; {verdict}; version {current.version} wins, @{alias} stays"
            return Registration(name, version, alias, False, current.version, message)
        client.set_registered_model_alias(name, alias, version)
    message = f"{registered}; {verdict}; version {version} wins, @{alias} -> {version}"
    return Registration(name, version, alias, True, version, message)


def _compare_runs(
    client: MlflowClient,
    current: ModelVersion,
    version: str,
    new_value: float,
    metric: str,
    alias: str,
) -> tuple[bool, str]:
    """The new version's run metric against the holder's run metric."""
    old_value = validation_metric(client.get_run(current.run_id).data.metrics, metric)
    shown_old = "n/a" if old_value is None else f"{old_value:.6g}"
    direction = "lower" if lower_is_better(metric) else "higher"
    verdict = (
        f"{metric}: new version {version} = {new_value:.6g} vs @{alias} version "
        f"{current.version} = {shown_old} ({direction} is better)"
    )
    return beats(new_value, old_value, metric), verdict


def _compare_on_holdout(
    client: MlflowClient,
    name: str,
    version: str,
    holder: str,
    metric: str,
    evidence: Evidence,
) -> tuple[bool, str]:
    """Both versions scored on the holdout; the decision and its evidence (version tags)."""
    from pipeline.serving.evaluate import evaluate

    key = evidence_metric(metric)
    result = evaluate(
        [f"models:/{name}/{holder}", f"models:/{name}/{version}"],
        evidence.data,
        client.tracking_uri,
        group_column=evidence.group_column,
        bootstrap=evidence.bootstrap,
        split=evidence.split,
    )
    gain = result.gains[1].get(key)
    if gain is None:
        raise InputError(f"--promote-if-better {metric}: `adatt evaluate` reports no {key}")
    down = lower_is_better(key)
    better = gain.high < -evidence.min_gain if down else gain.low > evidence.min_gain
    decision = "promoted" if better else "kept"
    for k, v in {
        tag.PROMOTION_METRIC: key,
        tag.PROMOTION_COMPARED_WITH: holder,
        tag.PROMOTION_GAIN: f"{gain.value:.6g}",
        tag.PROMOTION_GAIN_LOW: f"{gain.low:.6g}",
        tag.PROMOTION_GAIN_HIGH: f"{gain.high:.6g}",
        tag.PROMOTION_MIN_GAIN: f"{evidence.min_gain:.6g}",
        tag.PROMOTION_EVALUATION: result.run_id or "",
        tag.PROMOTION_DECISION: decision,
    }.items():
        client.set_model_version_tag(name, version, k, v)
    bound = (
        f"upper bound {gain.high:+.4g} < {-evidence.min_gain:+.4g}"
        if down
        else (f"lower bound {gain.low:+.4g} > {evidence.min_gain:+.4g}")
    )
    verdict = (
        f"{key} on the holdout: gain of version {version} over version {holder} = "
        f"{gain.value:+.4g} [{gain.low:+.4g}, {gain.high:+.4g}]; needs {bound}: "
        f"{'yes' if better else 'no'}"
    )
    return better, verdict
