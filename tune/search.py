"""`adatt tune`: the search driver. Checks the inputs once, opens the parent MLflow run, runs
Ray Tune over `tune.trial.run_trial`, then logs the search's outcome to the parent run.

Layout on storage (`train.storage_path` of the base config):
  <storage>/<name>/                Ray Tune experiment (what `--resume` restores)
  <storage>/<name>/adatt_search.json   the parent run id and the spec fingerprint
  <storage>/<name>-train/train-trial_id=<id>/   each trial's Ray Train run (checkpoints)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.tune
from mlflow.tracking import MlflowClient

from pipeline.config import Config
from pipeline.data.files import InputFiles
from pipeline.data.fit import fit_preprocessor
from pipeline.data.preprocess import Preprocessor
from pipeline.errors import ConfigError, InputError
from pipeline.runtime import resolve_use_gpu, storage_uri
from pipeline.tracking import tags
from pipeline.tracking.runs import (
    ensure_experiment,
    log_params,
    quiet_telemetry,
    resolve_tracking_uri,
    run_lifecycle,
    set_tracking,
)
from pipeline.training.checks import check_before_ray, start_ray_and_check_cluster
from pipeline.training.driver import RunContext, finish_run
from tune.report import TrialRow, log_search_outputs, summary_table, trial_rows
from tune.space import SearchSpec
from tune.trial import (
    SearchInputs,
    TrialRunCloser,
    child_runs,
    remove_orphaned_placement_groups,
    run_trial,
    trial_run_name,
)

STATE_FILE = "adatt_search.json"
# CPUs left to Ray Data's read/preprocess tasks: trial workers holding every CPU starve them.
DATA_CPUS = 1.0
TRIAL_DRIVER_MEMORY = 256 * 1024**2  # bytes reserved by each trial's driver


class SearchInterrupted(KeyboardInterrupt):
    """The search stopped before every trial ended (Ctrl+C); `adatt tune --resume` goes on."""


@dataclass
class SearchOutcome:
    """What a finished search produced."""

    parent_run_id: str
    tracking_uri: str
    experiment_path: str
    trials: list[TrialRow]
    best: TrialRow
    best_config: Config
    model_uri: str | None
    stopped_early: int
    registration: str | None = None
    table: list[str] = field(default_factory=list)


def trial_concurrency(
    cluster: dict[str, float], config: Config, use_gpu: bool, requested: int | None
) -> int:
    """How many trials run at once: what the CPUs (and GPUs) allow with `DATA_CPUS` left free.

    Example:
        >>> trial_concurrency({"CPU": 2}, cfg, False, None)  # 2 workers x 0.5 CPU  # doctest: +SKIP
        1
    """
    cpus = cluster.get("CPU", 0.0)
    per_trial = config.train.num_workers * config.train.cpus_per_worker
    allowed = math.floor((cpus - DATA_CPUS) / per_trial + 1e-9)
    if use_gpu:
        allowed = min(allowed, int(cluster.get("GPU", 0.0)) // config.train.num_workers)
    if allowed < 1:
        raise ConfigError(
            f"train.num_workers x train.cpus_per_worker = {per_trial:g} CPUs per trial: the "
            f"cluster's {cpus:g} CPUs leave none for Ray Data ({DATA_CPUS:g} kept free); "
            "lower train.cpus_per_worker"
        )
    return min(allowed, requested) if requested else allowed


def _searcher(spec: SearchSpec, concurrency: int) -> Any:
    settings = spec.settings
    if settings.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=settings.seed, points_to_evaluate=_points(spec))
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune applies max_concurrent_trials only to a searcher it creates itself.
    return BasicVariantGenerator(
        random_state=settings.seed, max_concurrent=concurrency, points_to_evaluate=_points(spec)
    )


def _points(spec: SearchSpec) -> list[dict[str, Any]] | None:
    return [spec.default_point()] if spec.settings.include_default else None


def _scheduler(spec: SearchSpec) -> Any:
    scheduler = spec.settings.scheduler
    if scheduler.type == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # Milestones count epochs; max_t lies past the last epoch so that ASHA never stops a
    # trial at its last epoch, before it reports its selected model.
    return ASHAScheduler(
        time_attr="epoch",
        max_t=spec.base.train.epochs + 1,
        grace_period=scheduler.grace_period,
        reduction_factor=scheduler.reduction_factor,
    )


def _trainable(inputs: SearchInputs) -> Any:
    # The trial function only drives a Ray Train run whose workers hold the CPUs; it reserves
    # memory instead (Tune refuses an empty request), so no CPU is taken from Ray Data.
    return ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, inputs=inputs),
        {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY},
    )


def _open_parent(
    client: MlflowClient, spec: SearchSpec, uri: str, experiment_path: str
) -> tuple[str, str]:
    experiment_id = ensure_experiment(client, spec.base.tracking.experiment, uri)
    run_tags = {
        tags.SEARCH: spec.name,
        tags.STORAGE: experiment_path,
        tags.MODEL: spec.base.model.name,
    }
    run = client.create_run(experiment_id, run_name=f"search {spec.name}", tags=run_tags)
    run_id = run.info.run_id
    log_params(client, run_id, spec.describe())
    client.log_dict(run_id, spec.base.model_dump(mode="json"), "base_config.yaml")
    return experiment_id, run_id


def run_search(
    spec: SearchSpec,
    resume: bool = False,
    register: str | None = None,
) -> SearchOutcome:
    """Run (or resume) a search and log its outcome to MLflow.

    Args:
        spec: the validated search (see `tune.space.load_search_spec`).
        resume: continue the interrupted search of the same name (`Tuner.restore`);
            finished trials are kept, unfinished ones continue from their last checkpoint.
        register: register the best trial's model under this name (alias `champion`).

    Raises:
        SearchInterrupted: the search was stopped (Ctrl+C) before every trial ended.
    """
    quiet_telemetry()
    config = spec.base
    uri = resolve_tracking_uri(config.tracking)
    storage = storage_uri(config.train.storage_path)
    experiment_path = f"{storage}/{spec.name}"
    # The same checks, in the same order, as `adatt train` (pipeline.training.checks).
    files = check_before_ray(config, uri)
    state_path = Path(experiment_path) / STATE_FILE
    exists = ray.tune.Tuner.can_restore(experiment_path)
    if resume and not (exists and state_path.is_file()):
        raise InputError(f"--resume: no search {spec.name!r} under {storage} to resume")
    if not resume and (exists or state_path.exists()):
        raise InputError(
            f"a search named {spec.name!r} already exists under {storage}: continue it with "
            "--resume, or start a new one with --set tune.name=<new name>"
        )

    if resume:
        state = json.loads(state_path.read_text())
        if state["fingerprint"] != spec.fingerprint():
            raise ConfigError(
                f"{spec.source}: the search space or base config changed since search "
                f"{spec.name!r} started; resume it with the same spec, or pick a new tune.name"
            )
        preprocessor = Preprocessor.from_dict(state["preprocessor"])
    else:
        preprocessor = fit_preprocessor(config.data, files)
    start_ray_and_check_cluster(uri, storage)
    client = set_tracking(uri)
    if resume:
        experiment_id, parent = state["experiment_id"], state["parent_run_id"]
    else:
        experiment_id, parent = _open_parent(client, spec, uri, experiment_path)
        Path(experiment_path).mkdir(parents=True, exist_ok=True)
        state = {
            "parent_run_id": parent,
            "experiment_id": experiment_id,
            "fingerprint": spec.fingerprint(),
            "preprocessor": preprocessor.to_dict(),
        }
        state_path.write_text(json.dumps(state))

    inputs = SearchInputs(
        spec=spec,
        files=files,
        preprocessor=preprocessor.to_dict(),
        tracking_uri=uri,
        experiment_id=experiment_id,
        parent_run_id=parent,
        train_storage=_train_storage(experiment_path),
    )
    cluster = ray.cluster_resources()
    concurrency = trial_concurrency(
        cluster, config, resolve_use_gpu(config.train, cluster), spec.settings.max_concurrent
    )
    with run_lifecycle(client, parent):
        try:
            results = _fit(spec, inputs, storage, concurrency, resume)
        finally:
            _close_open_trials(client, experiment_id, parent)
            _release_stopped_trials()
        unfinished = _unfinished_trials(experiment_path)
        if unfinished or len(results) < _expected_trials(spec):
            raise SearchInterrupted(
                f"search {spec.name!r} interrupted with {unfinished or 'some'} trial(s) left; "
                "continue it with --resume"
            )
        rows = trial_rows(results, spec, client, experiment_id, parent)
        _mark_stopped(client, rows)
        return _finish(
            client, uri, spec, rows, preprocessor, files, parent, experiment_path, register
        )


def _fit(
    spec: SearchSpec, inputs: SearchInputs, storage: str, concurrency: int, resume: bool
) -> Any:
    trainable = _trainable(inputs)
    if resume:
        tuner = ray.tune.Tuner.restore(f"{storage}/{spec.name}", trainable=trainable)
    else:
        settings = spec.settings
        tuner = ray.tune.Tuner(
            trainable,
            param_space=spec.param_space(),
            tune_config=ray.tune.TuneConfig(
                metric=settings.metric,
                mode=settings.mode,
                search_alg=_searcher(spec, concurrency),
                scheduler=_scheduler(spec),
                num_samples=settings.num_samples,
                # BasicVariantGenerator limits itself (see _searcher); Optuna gets wrapped.
                max_concurrent_trials=concurrency if spec.settings.searcher == "optuna" else None,
            ),
            run_config=ray.tune.RunConfig(
                name=spec.name,
                storage_path=storage,
                callbacks=[
                    TrialRunCloser(inputs.tracking_uri, inputs.experiment_id, inputs.parent_run_id)
                ],
                verbose=1,
            ),
        )
    return tuner.fit()


def _train_storage(experiment_path: str) -> str:
    """Where the trials' Ray Train runs keep their checkpoints (see the module docstring)."""
    return f"{experiment_path}-train"


def _unfinished_trials(experiment_path: str) -> int:
    """Trials not ended in the experiment state Tune saved last. After an interrupt Tune's
    in-memory trials all read TERMINATED (it stops them); the saved state keeps the truth."""
    analysis = ray.tune.ExperimentAnalysis(experiment_path)
    return sum(t.status not in ("TERMINATED", "ERROR") for t in analysis.trials)


def _expected_trials(spec: SearchSpec) -> int:
    grid = 1
    for dist in spec.space.values():
        if dist.grid is not None or (spec.settings.searcher == "grid" and dist.values):
            grid *= len(dist.values or [])
    return grid * spec.settings.num_samples


def _release_stopped_trials(wait_s: float = 5.0) -> None:
    """The last stopped trial's Train controller dies just after Tune returns: give it a few
    seconds, then free its placement group (see `remove_orphaned_placement_groups`)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            remove_orphaned_placement_groups()
        except Exception:  # a private Ray API; the next search's cleanup will catch up
            return
        if time.monotonic() >= deadline:
            return
        time.sleep(1.0)


def _mark_stopped(client: MlflowClient, rows: list[TrialRow]) -> None:
    """A trial stopped by the scheduler may have seen its Train run fail while being torn
    down (and marked its run FAILED): it was stopped, not broken."""
    for row in rows:
        if row.status == "stopped" and row.run_id:
            if client.get_run(row.run_id).info.status != "KILLED":
                client.set_terminated(row.run_id, status="KILLED")
            client.set_tag(row.run_id, tags.STOPPED, "true")


def _close_open_trials(client: MlflowClient, experiment_id: str, parent: str) -> None:
    """Trial runs still RUNNING when Tune returns belong to stopped or interrupted trials."""
    for run in child_runs(client, experiment_id, parent):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")


def _finish(
    client: MlflowClient,
    uri: str,
    spec: SearchSpec,
    rows: list[TrialRow],
    preprocessor: Preprocessor,
    files: InputFiles,
    parent: str,
    experiment_path: str,
    register: str | None,
) -> SearchOutcome:
    finished = [r for r in rows if r.status == "completed" and r.value is not None]
    if not finished:
        raise InputError(f"search {spec.name!r}: no trial finished; see the trial errors above")
    sign = 1 if spec.settings.mode == "max" else -1
    best = max(finished, key=lambda r: sign * r.value)
    best_config = spec.trial_config(best.values)
    # The best trial's selected model goes to its own run (so `adatt register --run` takes
    # it); the parent run points at it.
    storage = _train_storage(experiment_path)
    run = RunContext(best.run_id, uri, trial_run_name(best.trial_id), storage)
    checkpoint = ray.train.Checkpoint(best.checkpoint_path)
    outcome = finish_run(client, run, best_config, checkpoint, best.metrics, preprocessor, files)
    log_search_outputs(client, parent, spec, rows, best, best_config)
    client.set_tag(parent, tags.BEST_RUN, best.run_id)
    if outcome.model_uri:
        client.set_tag(parent, tags.BEST_MODEL, outcome.model_uri)
    registration = None
    if register:
        from pipeline.serving.registry import register_run

        registration = register_run(client, best.run_id, register).message
    return SearchOutcome(
        parent_run_id=parent,
        tracking_uri=uri,
        experiment_path=experiment_path,
        trials=rows,
        best=best,
        best_config=best_config,
        model_uri=outcome.model_uri,
        stopped_early=sum(r.status == "stopped" for r in rows),
        registration=registration,
        table=summary_table(rows, spec),
    )
