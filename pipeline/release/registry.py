"""`adatt register`: put a run's scoring model into the MLflow registry, tagged with what it
was trained on, and move an alias (e.g. `champion`) to it, optionally only if it is better.

A run of `adatt train` and the best trial of `adatt tune` (a child run) are the same thing
here: a run id whose run logged the scoring model `model`.

Every alias move happens under the promotion lease (`pipeline.release.lock`), and only on
evidence: the alias holder is read from the registry, and only a definite "no such alias"
means there is none; any other answer of the server (an error, a refusal) fails the
registration with the alias untouched. The comparison runs on the run's own model, before a
version is created, so a registration that fails its checks leaves no version behind; a
challenger that loses is registered, with `promotion.decision = kept`, and never gets the
alias.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import SplitConfig
from pipeline.errors import InputError
from pipeline.metrics_vocab import (
    beats,
    check_ranking_metric,
    evaluated_key,
    lower_is_better,
)
from pipeline.modelfile.format import schema_hash
from pipeline.modelfile.store import ModelRef, is_absent, read_model, resolve_model
from pipeline.release.evaluate import evaluate
from pipeline.release.lock import Lease, LeaseLost, promotion_lock
from pipeline.tracking import tags as tag


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


@dataclass
class Evidence:
    """How to decide a promotion from a comparison on a holdout (`adatt evaluate`)."""

    data: str | list[str]
    min_gain: float = 0.0
    group_column: str | None = None
    bootstrap: int = 200
    split: tuple[SplitConfig, str] | None = None  # only these rows of `data`


@dataclass
class _Verdict:
    """A comparison's outcome: whether the new model wins, in words, and version tags."""

    better: bool
    text: str
    tags: dict[str, str] = field(default_factory=dict)


def validation_metric(metrics: dict[str, float], metric: str) -> float | None:
    """A run's value of `metric` for its logged model.

    `best/<metric>` comes first: the logged model is the selected epoch's, while `val/...`
    without the prefix holds the last epoch's value.
    """
    for key in (f"best/{metric}", metric):
        if key in metrics:
            return metrics[key]
    return None


def alias_holder(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version `alias` points at; None only when the registry says there is none."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if is_absent(err):
            return None
        raise


def check_promotion(promote_if_better: str | None, evidence: Evidence | None) -> None:
    """InputError naming the flag unless the promotion metric suits the comparison."""
    if evidence is not None:
        if not promote_if_better:
            raise InputError("--data/--min-gain: give the metric with --promote-if-better")
        evaluated_key(promote_if_better, "--promote-if-better")
    elif promote_if_better:
        check_ranking_metric(promote_if_better, "--promote-if-better")


def _run_and_model(client: MlflowClient, run_id: str) -> tuple[Run, ModelRef]:
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if is_absent(err):
            raise InputError(f"--run {run_id}: no such MLflow run") from None
        raise
    ref = resolve_model(f"runs:/{run_id}/model", client, "--run")
    if not ref.uri.startswith("models:/m-"):
        raise InputError(f"--run {run_id}: the run has no logged model 'model'")
    return run, ref


def _version_tags(client: MlflowClient, run: Run, ref: ModelRef) -> dict[str, str]:
    spec = read_model(ref, client, weights=False).spec
    metrics = run.data.metrics
    return {
        tag.VERSION_SCHEMA_HASH: schema_hash(spec["preprocessor"]["data"]),
        tag.VERSION_GIT_COMMIT: run.data.tags.get(tag.GIT_COMMIT, "unknown"),
        tag.VERSION_MODEL_FAMILY: run.data.tags.get(tag.MODEL, spec["model"].get("name", "?")),
        tag.VERSION_RUN_ID: run.info.run_id,
        **{k: f"{v:.6g}" for k, v in metrics.items() if k.startswith(("best/val/", "test/"))},
    }


def _create_version(
    client: MlflowClient, name: str, run: Run, ref: ModelRef, tags: dict[str, str]
) -> str:
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if not is_absent(err):
            raise
        try:
            client.create_registered_model(name)
        except MlflowException as race:  # a racing registration created it
            if race.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    # The source is the model's artifact location: given `models:/m-...`, MLflow's SQL
    # registry resolves it with the process's global tracking URI, whatever the client's.
    model_id = ref.uri.removeprefix("models:/")
    version = client.create_model_version(
        name, ref.artifact_location, run_id=run.info.run_id, tags=tags, model_id=model_id
    )
    return str(version.version)


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
    and the run's `best/val/...` and `test/...` metrics. The comparison with the alias
    holder and the move happen under the promotion lease, so racing registrations compare
    one after another, each with the holder the previous one left.

    Args:
        client: a client of the tracking server that holds the run and the registry.
        run_id: an `adatt train` run, or the best trial's (child) run of an `adatt tune`.
        name: the registered model name (created on first use).
        alias: the alias to move (None: register only).
        promote_if_better: a validation metric (e.g. `val/mean_auc`); the alias moves only if
            the new version beats the current holder on it (ties keep the holder).
        evidence: compare on a holdout instead of the runs' own metrics: both models are
            scored on `evidence.data` and the alias moves only when the lower end of the
            new model's gain interval is above `evidence.min_gain` (the upper end below
            `-min_gain` for NE and MSE); the evidence becomes `promotion.*` version tags.
    """
    check_promotion(promote_if_better, evidence)
    run, ref = _run_and_model(client, run_id)
    by_run_metric = promote_if_better and evidence is None
    if by_run_metric and validation_metric(run.data.metrics, promote_if_better) is None:
        raise InputError(
            f"--promote-if-better {promote_if_better}: run {run_id} has no such metric"
        )
    tags = _version_tags(client, run, ref)
    registered = f"registered {name} version {{version}} (run {run_id})"
    if alias is None:
        version = _create_version(client, name, run, ref, tags)
        return Registration(name, version, None, False, None, registered.format(version=version))
    with promotion_lock(client, name) as lease:
        holder = alias_holder(client, name, alias)
        verdict = _judge(client, run, ref, holder, name, alias, promote_if_better, evidence)
        tags.update(verdict.tags)
        decided = tags.get(tag.PROMOTION_DECISION)
        if verdict.better and decided:  # "promoted" only once the alias has moved
            tags[tag.PROMOTION_DECISION] = tag.PENDING
        tags[tag.PROMOTION_FENCE] = str(lease.fence)
        version = _create_version(client, name, run, ref, tags)
        if verdict.better:
            _move_alias(client, lease, name, alias, version, decided)
    done = registered.format(version=version)
    if verdict.better:
        won = f"version {version} wins, " if verdict.text else ""
        message = f"{done}; {verdict.text}{won}@{alias} -> {version}"
        return Registration(name, version, alias, True, version, message)
    message = f"{done}; {verdict.text}version {holder.version} wins, @{alias} stays"
    return Registration(name, version, alias, False, holder.version, message)


def _move_alias(
    client: MlflowClient, lease: Lease, name: str, alias: str, version: str, decided: str | None
) -> None:
    """Move `alias` to `version` while this holder's fence is the current one; then write
    the version's decision (`decided`, when the verdict has one). When the move fails (a
    lost lease, a server error), the decision becomes `failed` if the registry still
    answers, and stays `pending` otherwise: never `promoted` without the alias."""
    try:
        lease.check()  # a holder whose lease was taken over must not move the alias
        client.set_registered_model_alias(name, alias, version)
    except (LeaseLost, MlflowException):
        if decided:
            with contextlib.suppress(MlflowException):
                client.set_model_version_tag(name, version, tag.PROMOTION_DECISION, tag.FAILED)
        raise
    if decided:
        try:
            client.set_model_version_tag(name, version, tag.PROMOTION_DECISION, decided)
        except MlflowException as err:  # the alias moved: the registration stands
            print(
                f"warning: {name} version {version} holds @{alias}, but its "
                f"{tag.PROMOTION_DECISION} tag stays {tag.PENDING}: {err.error_code}",
                file=sys.stderr,
                flush=True,
            )


def _judge(
    client: MlflowClient,
    run: Run,
    ref: ModelRef,
    holder: ModelVersion | None,
    name: str,
    alias: str,
    promote_if_better: str | None,
    evidence: Evidence | None,
) -> _Verdict:
    """Whether the new model takes the alias from `holder`, and why."""
    if holder is None:
        decided = {tag.PROMOTION_DECISION: "no holder"} if evidence is not None else {}
        return _Verdict(True, "", decided)
    if not promote_if_better:
        return _Verdict(True, "")
    if evidence is not None:
        return _compare_on_holdout(client, holder, ref, name, promote_if_better, evidence)
    return _compare_runs(client, holder, run, promote_if_better, alias)


def _compare_runs(
    client: MlflowClient, holder: ModelVersion, run: Run, metric: str, alias: str
) -> _Verdict:
    """The new run's metric against the holder's run metric."""
    new_value = validation_metric(run.data.metrics, metric)
    old_value = validation_metric(client.get_run(holder.run_id).data.metrics, metric)
    shown_old = "n/a" if old_value is None else f"{old_value:.6g}"
    direction = "lower" if lower_is_better(metric) else "higher"
    text = (
        f"{metric}: new model = {new_value:.6g} vs @{alias} version {holder.version} = "
        f"{shown_old} ({direction} is better); "
    )
    return _Verdict(beats(new_value, old_value, metric), text)


def _compare_on_holdout(
    client: MlflowClient,
    holder: ModelVersion,
    ref: ModelRef,
    name: str,
    metric: str,
    evidence: Evidence,
) -> _Verdict:
    """Both models scored on the holdout; the decision and its evidence (version tags)."""
    key = evaluated_key(metric, "--promote-if-better")
    result = evaluate(
        client,
        [f"models:/{name}/{holder.version}", ref.uri],
        evidence.data,
        group_column=evidence.group_column,
        bootstrap=evidence.bootstrap,
        split=evidence.split,
    )
    gain = result.gains[1].get(key)
    if gain is None:
        raise InputError(f"--promote-if-better {metric}: `adatt evaluate` reports no {key}")
    down = lower_is_better(key)
    better = gain.high < -evidence.min_gain if down else gain.low > evidence.min_gain
    tags = {
        tag.PROMOTION_METRIC: key,
        tag.PROMOTION_COMPARED_WITH: str(holder.version),
        tag.PROMOTION_GAIN: f"{gain.value:.6g}",
        tag.PROMOTION_GAIN_LOW: f"{gain.low:.6g}",
        tag.PROMOTION_GAIN_HIGH: f"{gain.high:.6g}",
        tag.PROMOTION_MIN_GAIN: f"{evidence.min_gain:.6g}",
        tag.PROMOTION_EVALUATION: result.run_id or "",
        tag.PROMOTION_DECISION: "promoted" if better else "kept",
    }
    bound = (
        f"upper bound {gain.high:+.4g} < {-evidence.min_gain:+.4g}"
        if down
        else f"lower bound {gain.low:+.4g} > {evidence.min_gain:+.4g}"
    )
    text = (
        f"{key} on the holdout: gain over version {holder.version} = {gain.value:+.4g} "
        f"[{gain.low:+.4g}, {gain.high:+.4g}]; needs {bound}: {'yes' if better else 'no'}; "
    )
    return _Verdict(better, text, tags)
