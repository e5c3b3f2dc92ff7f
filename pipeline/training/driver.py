"""`adatt train`: the driver. Runs the checks (`pipeline.training.checks`), starts the MLflow
run, runs the Ray Train `TorchTrainer` over the Ray Data splits, then logs the selected model
and its plots (`pipeline.training.outputs`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from pipeline.config import Config, parse_config, upgrade_stored_config
from pipeline.data.files import InputFiles, as_uri, file_days
from pipeline.data.fit import count_split_rows, fit
from pipeline.data.plan import SplitRows
from pipeline.data.preprocess import Preprocessor
from pipeline.errors import InputError, Stopped
from pipeline.intervals import parse_interval
from pipeline.session import Session, interruptible, open_session, storage_uri
from pipeline.tracking import tags
from pipeline.tracking.runs import log_metrics, run_lifecycle, start_run
from pipeline.training.board import ProgressBoard, progress_shown
from pipeline.training.callbacks import RunLogger
from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.checks import check_before_ray, start_ray_and_check_cluster
from pipeline.training.faults import FAULT_ENV
from pipeline.training.loop import NonFiniteLoss, train_loop
from pipeline.training.outputs import log_outputs, oracle_metrics
from pipeline.training.resources import WorkerPlan, plan_workers, with_workers
from pipeline.training.resume import Resumed, resolve_resume
from pipeline.training.warm_start import WarmStart, resolve_warm_start


@dataclass
class TrainingOutcome:
    """What a finished training produced."""

    run_id: str
    tracking_uri: str
    metrics: dict[str, float]
    checkpoint_path: str  # the final checkpoint: a local path, or a URI for URI storage
    model_uri: str | None
    oracle: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunContext:
    """Where one training logs and checkpoints.

    Attributes:
        run_id: the MLflow run.
        tracking_uri: the MLflow tracking URI holding it.
        name: the Ray Train run name (its checkpoints are under `storage`/`name`).
        storage: Ray Train's storage path (absolute path or URI).
    """

    run_id: str
    tracking_uri: str
    name: str
    storage: str


def git_commit() -> str:
    """The commit of the working directory, or "unknown" (a run tag)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


MAX_LISTED_DAYS = 200


def data_days(paths: list[str]) -> str:
    """The days of the files a run reads, for the run's `adatt.data_days` tag: the days
    listed (comma-separated), or `first..last` beyond `MAX_LISTED_DAYS`; "" for files not
    named by day."""
    days = sorted(set().union(*(file_days(p) for p in paths)))
    if len(days) > MAX_LISTED_DAYS:
        return f"{days[0]}..{days[-1]}"
    return ",".join(days)


def plan_loop(
    config: Config, preprocessor: Preprocessor, counts: SplitRows
) -> tuple[Config, WorkerPlan, dict[str, Any]]:
    """The run's worker plan on the connected cluster, its config with the planned workers,
    and what every worker's loop needs to build its feed (`loop.make_feed`): the config,
    the preprocessing, each file's rows of each split, the cluster's CPUs."""
    cluster = ray.cluster_resources()
    plan = plan_workers(config.train, cluster)
    config = with_workers(config, plan)
    loop_config = {
        "config": config.model_dump(mode="json"),
        "preprocessor": preprocessor.to_dict(),
        "counts": counts.to_dict(),
        "cluster_cpus": cluster.get("CPU", 1.0),
    }
    return config, plan, loop_config


def make_trainer(
    config: Config,
    preprocessor: Preprocessor,
    counts: SplitRows,
    run: RunContext,
    *,
    callbacks: list[Any] | None = None,
    resume_from: str | None = None,
    warm_start: WarmStart | None = None,
    progress: Any = None,
) -> TorchTrainer:
    """The TorchTrainer for one training run; a Tune trial builds the same one. The workers
    read their own rows of each epoch (`pipeline.data.feed`), planned from `counts`. With
    `warm_start`, they start from its weights (through the object store, so the workers of
    a cluster read them too); with `progress`, rank 0 posts to that board
    (`pipeline.training.board`)."""
    task_names = [t.name for t in config.data.tasks]
    config, plan, loop_config = plan_loop(config, preprocessor, counts)
    return TorchTrainer(
        train_loop,
        train_loop_config={
            **loop_config,
            "mlflow_run_id": run.run_id,
            "resume_from": resume_from,
            "warm_start": ray.put(warm_start.weights) if warm_start else None,
            "progress": progress,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.num_workers,
            use_gpu=plan.use_gpu,
            resources_per_worker=plan.resources(),
            placement_strategy=config.train.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=run.storage,
            failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.train.checkpoints_to_keep
            ),
            callbacks=[RunLogger(run.tracking_uri, run.run_id, task_names), *(callbacks or [])],
            worker_runtime_env=_forwarded_env(),
            # Ray Train's INFO lines repeat every report in full; the epoch line says it once.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def finish_run(
    client: Any,
    run: RunContext,
    config: Config,
    checkpoint: ray.train.Checkpoint,
    metrics: dict[str, Any],
    preprocessor: Preprocessor,
    files: InputFiles,
) -> TrainingOutcome:
    """Log the selected model (the final checkpoint's), its plots and the oracle metrics to
    `run`; return the outcome. `metrics` are the final report's."""
    with checkpoint.as_directory() as folder:
        final = load_checkpoint(folder)
        if final.sharded:  # full tables, read on this process without a process group
            from pipeline.training.sharding import load_dense_weights

            final.model = load_dense_weights(folder, config)
    numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    model_uri = log_outputs(client, run.run_id, config, final, preprocessor, files)
    oracle = oracle_metrics(config.data, files)
    log_metrics(client, run.run_id, oracle)
    # Ray gives the path within the storage's filesystem: for s3:// storage, no scheme.
    path = as_uri(checkpoint.path, run.storage)
    return TrainingOutcome(run.run_id, run.tracking_uri, numeric, path, model_uri, oracle)


@dataclass
class _Inputs:
    """What a training starts from, found before Ray starts: the (stored) config, the
    checked files and their rows of each split, the preprocessing, and the run it continues
    or the model it starts from."""

    config: Config
    files: InputFiles
    counts: SplitRows
    preprocessor: Preprocessor
    storage: str
    resumed: Resumed | None = None
    parent: WarmStart | None = None


def prepare_inputs(
    config: Config, session: Session, resume: str | None, warm_start: str | None, refit: bool
) -> _Inputs:
    """Every check before Ray starts, in the documented order (`pipeline.training.checks`),
    and the preprocessing: the resumed run's, the model's (warm start), or fitted."""
    storage, resumed = storage_uri(config.train.storage_path), None
    if resume:
        resumed = resolve_resume(resume, session.client)
        # The stored config, with this command's `train.epochs`.
        raw, notes = upgrade_stored_config(resumed.state.config)
        for note in notes:
            print(f"warning: checkpoint config: {note}", file=sys.stderr, flush=True)
        stored = parse_config(raw, source="checkpoint config")
        epochs = {"epochs": config.train.epochs}
        config = stored.model_copy(update={"train": stored.train.model_copy(update=epochs)})
        run_tags = session.client.get_run(resumed.run_id).data.tags
        storage = run_tags.get(tags.STORAGE, storage)
    files = check_before_ray(config)
    parent = resolve_warm_start(warm_start, session.client, config) if warm_start else None
    if resumed is not None:
        preprocessor = Preprocessor.from_dict(resumed.state.preprocessor)
        counts = count_split_rows(config.data, files)
    else:
        # The row pass checks the day's data even when the statistics stay the model's.
        preprocessor, counts = fit(config.data, files)
        if parent is not None:
            preprocessor = parent.preprocessor(config, preprocessor, refit)
    return _Inputs(config, files, counts, preprocessor, storage, resumed, parent)


def open_run(session: Session, inputs: _Inputs) -> RunContext:
    """The MLflow run the training logs to: the resumed one, or a new one with its tags."""
    if inputs.resumed is not None:
        run_id, name = inputs.resumed.run_id, inputs.resumed.ray_name
        session.client.set_tag(run_id, tags.RAY_SEGMENT, name)
        return RunContext(run_id, session.tracking_uri, name, inputs.storage)
    config = inputs.config
    run_tags = {
        tags.GIT_COMMIT: git_commit(),
        tags.MODEL: config.model.name,
        tags.DATA_DAYS: data_days(inputs.files.paths),
    }
    if inputs.parent is not None:
        run_tags.update(inputs.parent.lineage_tags(inputs.files, config))
    run_id = start_run(session.client, config, session.tracking_uri, tags=run_tags)
    name = f"adatt-{run_id}"
    session.client.set_tag(run_id, tags.STORAGE, inputs.storage)
    session.client.set_tag(run_id, tags.RAY_RUN, name)
    return RunContext(run_id, session.tracking_uri, name, inputs.storage)


def run_training(
    config: Config,
    resume: str | None = None,
    warm_start: str | None = None,
    refit_stats: bool = False,
    session: Session | None = None,
) -> TrainingOutcome:
    """Train `config` (or resume a run) and return the run id and final metrics.

    Args:
        config: the validated training config.
        resume: a checkpoint path or an MLflow run id to continue; the stored config and
            preprocessing are reused, except `train.epochs`, taken from `config`.
        warm_start: a model to start a new run from (`pipeline.training.warm_start`): its
            weights, and its dense statistics unless `refit_stats`.
        refit_stats: with `warm_start`, fit the dense statistics on this run's data.
        session: the command's session (default: one for `config.tracking`).
    """
    if resume and warm_start:
        raise InputError("--resume continues a run, --warm-start starts a new one: pick one")
    if refit_stats and not warm_start:
        raise InputError("--refit-stats applies to --warm-start (a cold start always fits)")
    session = session or open_session("train", config.tracking)
    inputs = prepare_inputs(config, session, resume, warm_start, refit_stats)
    inputs.config = start_ray_and_check_cluster(session, inputs.storage, inputs.config)
    run = open_run(session, inputs)
    session.echo(
        f"run {run.run_id}: {inputs.config.model.name} on {inputs.files.rows:,} rows of "
        f"{len(inputs.files)} file(s), {inputs.config.train.num_workers} worker(s)"
    )
    board = ProgressBoard.remote()
    every = parse_interval(inputs.config.train.progress_every).seconds
    try:
        with interruptible(), run_lifecycle(session.client, run.run_id):
            trainer = make_trainer(
                inputs.config,
                inputs.preprocessor,
                inputs.counts,
                run,
                resume_from=inputs.resumed.checkpoint if inputs.resumed else None,
                warm_start=inputs.parent,
                progress=board,
            )
            with progress_shown(board, inputs.config.train.epochs, every, session.echo):
                result = _fit(trainer)
            return finish_run(
                session.client,
                run,
                inputs.config,
                result.checkpoint,
                result.metrics,
                inputs.preprocessor,
                inputs.files,
            )
    except KeyboardInterrupt:
        print(
            f"interrupted: MLflow run {run.run_id} marked KILLED; continue it from its last "
            f"checkpoint with: adatt train --config <config> --resume {run.run_id}",
            file=sys.stderr,
            flush=True,
        )
        raise


class TrainingStopped(Stopped):
    """Training stopped on a condition the loop checks (a non-finite loss): one line."""


def _fit(trainer: TorchTrainer) -> ray.train.Result:
    """`trainer.fit()`, a worker's `NonFiniteLoss` turned into one `TrainingStopped` line."""
    try:
        return trainer.fit()
    except ray.train.WorkerGroupError as err:
        failures = getattr(err, "worker_failures", {}).values()
        stopped = [f for f in failures if isinstance(f, NonFiniteLoss)]
        if stopped:
            message = str(stopped[0]).strip().splitlines()[-1]
            raise TrainingStopped(message.split("NonFiniteLoss: ")[-1]) from None
        raise


def _forwarded_env() -> dict[str, Any] | None:
    """Pass the fault-injection test hook (see `pipeline/training/faults.py`) to the workers."""
    fault = os.environ.get(FAULT_ENV)
    return {"env_vars": {FAULT_ENV: fault}} if fault else None
