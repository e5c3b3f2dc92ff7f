"""`adatt tune`: the search driver. Checks the inputs once, opens the parent MLflow run, runs
Ray Tune over `tune.trial.run_trial`, then logs the search's outcome to the parent run.

Layout on storage (`train.storage_path` of the base config):
  <storage>/<name>/                Ray Tune experiment (what `--resume` restores)
  <storage>/<name>/adatt_search.json   the parent run id and the spec fingerprint
  <storage>/<name>-train/train-trial_id=<id>/   each trial's Ray Train run (checkpoints)
  <storage>/<name>-preprocessed/<split>/   the logs preprocessed once, read by every trial
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.train
import ray.tune
from mlflow.tracking import MlflowClient

from pipeline.config import Config
from pipeline.data.files import InputFiles, as_uri, exists, join, read_text, write_text
from pipeline.data.fit import count_split_rows, fit
from pipeline.data.ingest import DATA_TASK_CPUS
from pipeline.data.materialise import materialise
from pipeline.data.preprocess import Preprocessor
from pipeline.errors import ConfigError, InputError
from pipeline.release.registry import register_run
from pipeline.session import Session, open_session, storage_uri
from pipeline.tracking import tags
from pipeline.tracking.runs import ensure_experiment, log_params, run_lifecycle
from pipeline.training.checks import check_before_ray, start_ray_and_check_cluster
from pipeline.training.driver import RunContext, finish_run
from pipeline.training.resources import plan_workers
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


def trial_concurrency(cluster: dict[str, float], config: Config, requested: int | None) -> int:
    """How many trials run at once: what the CPUs allow with `DATA_CPUS` left free, and on
    GPUs what the GPUs allow, each trial's workers reserving `train.gpus_per_worker` of one
    (fractions let trials share a GPU). ConfigError naming the fields when not one fits.

    Example:
        >>> from types import SimpleNamespace
        >>> from pipeline.config import TrainConfig
        >>> cfg = SimpleNamespace(train=TrainConfig(num_workers=1, gpus_per_worker=0.25))
        >>> trial_concurrency({"CPU": 16.0, "GPU": 1.0}, cfg, None)  # 4 trials share the GPU
        4
    """
    plan = plan_workers(config.train, cluster)
    cpus = cluster.get("CPU", 0.0)
    per_trial = plan.num_workers * plan.cpus_per_worker
    allowed = math.floor((cpus - DATA_CPUS) / per_trial + 1e-9)
    if allowed < 1:
        raise ConfigError(
            f"train.num_workers x train.cpus_per_worker = {per_trial:g} CPUs per trial: the "
            f"cluster's {cpus:g} CPUs leave none for Ray Data ({DATA_CPUS:g} kept free); "
            "lower train.cpus_per_worker"
        )
    if plan.use_gpu:  # plan_workers refused a trial that needs more GPUs than there are
        allowed = min(allowed, math.floor(cluster.get("GPU", 0.0) / plan.gpus + 1e-9))
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

    # Milestones count validations (`train.validate_every`: at epoch ends, or inside an
    # epoch too, so a one-epoch search can stop a bad trial early). No horizon: a trial
    # ends by itself; one stopped at a milestone is stopped, whenever that is.
    return ASHAScheduler(
        time_attr="validations",
        max_t=2**31,
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


def _search_state(spec: SearchSpec, storage: str, resume: bool) -> dict[str, Any] | None:
    """The saved state of the search to resume (None for a new one); InputError when
    `resume` does not match what is under `storage` (local folder or object store)."""
    experiment_path = join(storage, spec.name)
    state_path = join(experiment_path, STATE_FILE)
    found = ray.tune.Tuner.can_restore(experiment_path)
    if resume and not (found and exists(state_path)):
        raise InputError(f"--resume: no search {spec.name!r} under {storage} to resume")
    if not resume and (found or exists(state_path)):
        raise InputError(
            f"a search named {spec.name!r} already exists under {storage}: continue it with "
            "--resume, or start a new one with --set tune.name=<new name>"
        )
    if not resume:
        return None
    state = json.loads(read_text(state_path))
    if state["fingerprint"] != spec.fingerprint():
        raise ConfigError(
            f"{spec.source}: the search space or base config changed since search "
            f"{spec.name!r} started; resume it with the same spec, or pick a new tune.name"
        )
    return state


def _new_search(
    session: Session, spec: SearchSpec, experiment_path: str, preprocessor: Preprocessor
) -> dict[str, Any]:
    """Open the parent run and save the search's state beside Tune's experiment."""
    experiment_id, parent = _open_parent(
        session.client, spec, session.tracking_uri, experiment_path
    )
    state = {
        "parent_run_id": parent,
        "experiment_id": experiment_id,
        "fingerprint": spec.fingerprint(),
        "preprocessor": preprocessor.to_dict(),
    }
    write_text(join(experiment_path, STATE_FILE), json.dumps(state))
    return state


def run_search(
    spec: SearchSpec,
    resume: bool = False,
    register: str | None = None,
    session: Session | None = None,
) -> SearchOutcome:
    """Run (or resume) a search and log its outcome to MLflow.

    Args:
        spec: the validated search (see `tune.space.load_search_spec`).
        resume: continue the interrupted search of the same name (`Tuner.restore`);
            finished trials are kept, unfinished ones continue from their last checkpoint.
        register: register the best trial's model under this name (alias `champion`).
        session: the command's session (default: one for the base config's tracking).

    Raises:
        SearchInterrupted: the search was stopped (Ctrl+C) before every trial ended.
    """
    config = spec.base
    session = session or open_session("tune", config.tracking)
    storage = storage_uri(config.train.storage_path)
    experiment_path = join(storage, spec.name)
    # The same checks, in the same order, as `adatt train` (pipeline.training.checks).
    files = check_before_ray(config)
    state = _search_state(spec, storage, resume)
    if state is not None:
        preprocessor = Preprocessor.from_dict(state["preprocessor"])
        counts = count_split_rows(config.data, files)
    else:
        preprocessor, counts = fit(config.data, files)
    # Every trial runs the base's resources (they are fixed for a search): resolved once.
    spec.base = start_ray_and_check_cluster(session, storage, config)
    state = state or _new_search(session, spec, experiment_path, preprocessor)
    # The logs read and preprocessed once for every trial (`pipeline.data.materialise`).
    counts = materialise(preprocessor, counts, _preprocessed(experiment_path), DATA_TASK_CPUS)
    inputs = SearchInputs(
        spec=spec,
        files=files,
        counts=counts,
        preprocessor=preprocessor.to_dict(),
        tracking_uri=session.tracking_uri,
        experiment_id=state["experiment_id"],
        parent_run_id=state["parent_run_id"],
        train_storage=_train_storage(experiment_path),
    )
    session.echo(f"search {spec.name!r} (parent run {inputs.parent_run_id}) under {storage}")
    rows = _run_trials(session.client, spec, inputs, storage, resume)
    return _finish(
        session, spec, rows, preprocessor, files, inputs.parent_run_id, experiment_path, register
    )


def _run_trials(
    client: MlflowClient, spec: SearchSpec, inputs: SearchInputs, storage: str, resume: bool
) -> list[TrialRow]:
    """Run the trials under the parent run; their rows once every trial has ended."""
    concurrency = trial_concurrency(
        ray.cluster_resources(), spec.base, spec.settings.max_concurrent
    )
    experiment_path = join(storage, spec.name)
    parent = inputs.parent_run_id
    with run_lifecycle(client, parent):
        try:
            results = _fit(spec, inputs, storage, concurrency, resume)
        finally:
            _close_open_trials(client, inputs.experiment_id, parent)
            _release_stopped_trials()
        unfinished = _unfinished_trials(experiment_path)
        if unfinished or len(results) < _expected_trials(spec):
            raise SearchInterrupted(
                f"search {spec.name!r} interrupted with {unfinished or 'some'} trial(s) left; "
                "continue it with --resume"
            )
        rows = trial_rows(results, spec, client, inputs.experiment_id, parent)
        _mark_stopped(client, rows)
        return rows


# Ray Tune copies these from the driver's environment into every trial actor's runtime_env
# (`ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE`), and Ray writes each runtime_env
# it creates, values and all, to `runtime_env_agent.log` on the node. A trial's actors take
# their credentials as `adatt train`'s workers do: from the node's environment (the one the
# raylet started with, or an instance role).
CREDENTIAL_ENV = frozenset(
    {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"}
)


@contextlib.contextmanager
def credentials_kept_out_of_ray_logs() -> Iterator[None]:
    """While inside, Ray Tune does not put `CREDENTIAL_ENV` into trial actors' runtime_envs."""
    from ray.tune.execution import class_cache

    propagated = class_cache.ENV_VARS_TO_PROPAGATE
    class_cache.ENV_VARS_TO_PROPAGATE = propagated - CREDENTIAL_ENV
    try:
        yield
    finally:
        class_cache.ENV_VARS_TO_PROPAGATE = propagated


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
                mode=settings.direction,
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
    with credentials_kept_out_of_ray_logs():
        return tuner.fit()


def _preprocessed(experiment_path: str) -> str:
    """Where the search's one preprocessed copy of its splits is kept."""
    return f"{experiment_path.rstrip('/')}-preprocessed"


def _train_storage(experiment_path: str) -> str:
    """Where the trials' Ray Train runs keep their checkpoints (see the module docstring)."""
    return f"{experiment_path.rstrip('/')}-train"


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
    session: Session,
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
    sign = 1 if spec.settings.direction == "max" else -1
    best = max(finished, key=lambda r: sign * r.value)
    best_config = spec.trial_config(best.values)
    # The best trial's selected model goes to its own run (so `adatt register --run` takes
    # it); the parent run points at it.
    client, uri = session.client, session.tracking_uri
    run = RunContext(
        best.run_id, uri, trial_run_name(best.trial_id), _train_storage(experiment_path)
    )
    checkpoint = ray.train.Checkpoint(as_uri(best.checkpoint_path, run.storage))
    outcome = finish_run(client, run, best_config, checkpoint, best.metrics, preprocessor, files)
    log_search_outputs(client, parent, spec, rows, best, best_config)
    client.set_tag(parent, tags.BEST_RUN, best.run_id)
    if outcome.model_uri:
        client.set_tag(parent, tags.BEST_MODEL, outcome.model_uri)
    registration = register_run(client, best.run_id, register).message if register else None
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
