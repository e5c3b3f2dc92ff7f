"""`adatt train`: the driver. Checks inputs, starts the MLflow run, runs the Ray Train
`TorchTrainer` over the Ray Data splits, then logs the selected model and its plots.

Everything that can be wrong with the input (config, data, tracking server) is checked
here, in this order, before Ray starts and before anything is written: the tracking store,
credentials in URIs, the files' footers (`check_schema`), then one streaming pass over the
rows (`fit_preprocessor`: NaN/inf, label values). Only then is Ray started, the cluster
rules checked and the MLflow run created. See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from models import build_model
from pipeline.checkpoint import FILENAME as CHECKPOINT_FILE
from pipeline.checkpoint import TrainingState, load_checkpoint
from pipeline.cluster_rules import check_cluster_rules, is_remote_submission
from pipeline.config import Config, TrainConfig, parse_config
from pipeline.errors import InputError
from pipeline.faults import FAULT_ENV, fault_from_env
from pipeline.ingest import build_datasets, ray_data_context_for_training
from pipeline.preprocess import Preprocessor, fit_preprocessor
from pipeline.report import log_fusion_plots, oracle_metrics, raw_example
from pipeline.schema import check_schema
from pipeline.security import check_no_credentials
from pipeline.serving import log_scoring_model
from pipeline.tracking import (
    EpochLogger,
    check_tracking_reachable,
    log_metrics,
    quiet_telemetry,
    resolve_tracking_uri,
    run_lifecycle,
    set_tracking,
    start_run,
)
from pipeline.train_loop import train_loop

TAG_STORAGE = "adatt.storage_path"
TAG_RAY_RUN = "adatt.ray_run_name"


@dataclass
class TrainingOutcome:
    """What a finished training produced."""

    run_id: str
    tracking_uri: str
    metrics: dict[str, float]
    checkpoint_path: str
    model_uri: str | None
    oracle: dict[str, float] = field(default_factory=dict)


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest `checkpoint_*` folder of a Ray Train run folder that holds a checkpoint
    file, if any (a driver killed while a checkpoint was copied can leave an empty one)."""
    found = sorted(
        (p for p in folder.glob("checkpoint_*") if (p / CHECKPOINT_FILE).is_file()),
        key=lambda p: p.stat().st_mtime,
    )
    return found[-1] if found else None


def _resolve_resume(resume: str, client: Any) -> tuple[str, TrainingState, str]:
    """`--resume` is a checkpoint path or an MLflow run id; return (run id, state, ray name)."""
    path = Path(resume)
    if path.exists():
        state = load_checkpoint(path)
        if not state.mlflow_run_id:
            raise InputError(f"{path}: checkpoint has no MLflow run id to resume into")
        run = client.get_run(state.mlflow_run_id)
        return state.mlflow_run_id, state, run.data.tags.get(TAG_RAY_RUN, state.mlflow_run_id)
    try:
        run = client.get_run(resume)
    except Exception:
        raise InputError(
            f"--resume {resume}: neither a checkpoint path nor an MLflow run id"
        ) from None
    if run.info.status == "FINISHED":
        raise InputError(f"--resume {resume}: the run already FINISHED; nothing to resume")
    if TAG_RAY_RUN not in run.data.tags or TAG_STORAGE not in run.data.tags:
        raise InputError(f"--resume {resume}: not a run started by `adatt train`")
    if run.info.status == "RUNNING":
        # What a SIGKILL'd driver leaves behind; a live driver would make this a mistake.
        print(
            f"resuming run {resume}, marked RUNNING: its driver must have died",
            file=sys.stderr,
        )
    name = run.data.tags[TAG_RAY_RUN]
    folder = Path(run.data.tags[TAG_STORAGE]) / name
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        raise InputError(f"--resume {resume}: no checkpoint under {folder}")
    return resume, load_checkpoint(checkpoint), name


def init_ray() -> None:
    """Connect to RAY_ADDRESS's cluster, or start a local one."""
    if not ray.is_initialized():
        # A local cluster's dashboard listens on loopback only.
        ray.init(dashboard_host="127.0.0.1", log_to_driver=True)


def storage_uri(path: str) -> str:
    """Ray Train needs an absolute path or a URI for checkpoints."""
    return path if "://" in path else str(Path(path).resolve())


def check_data(config: Config, uri: str) -> list[str]:
    """The checks that need neither Ray nor a write: the tracking store (reachable, with a
    timeout), credentials in URIs, the fault hook, and the data files' footers. Returns the
    resolved data files."""
    check_tracking_reachable(uri)
    check_no_credentials(config)
    fault_from_env()  # a malformed ADATT_FAULT fails here, not in a worker
    return check_schema(config.data)


def check_cluster(uri: str, storage: str) -> None:
    """Start (or join) Ray and check the cluster rules: shared storage, a tracking server."""
    init_ray()
    alive = [n for n in ray.nodes() if n["Alive"]]
    check_cluster_rules(storage, uri, len(alive), is_remote_submission())


def check_inputs(config: Config, uri: str, storage: str) -> list[str]:
    """Every check that can fail on bad input, before anything is written: the tracking
    store and the data schema (without Ray), then the cluster rules. Returns the resolved
    data files."""
    files = check_data(config, uri)
    check_cluster(uri, storage)
    return files


def training_file_order(files: list[str], config: Config) -> list[str]:
    """Files in the order Ray Data reads them: as given (shuffled anew by Ray each epoch),
    or, with `train.deterministic`, one permutation seeded by `train.seed`."""
    if not config.train.deterministic:
        return files
    order = sorted(files)
    random.Random(config.train.seed).shuffle(order)
    return order


def make_trainer(
    config: Config,
    preprocessor: Preprocessor,
    files: list[str],
    *,
    run_id: str,
    tracking_uri: str,
    name: str,
    storage: str,
    callbacks: list[Any] | None = None,
    resume_from: str | None = None,
) -> TorchTrainer:
    """The TorchTrainer for one training run; a Tune trial builds the same one."""
    tasks = [t.name for t in config.data.tasks]
    # Before the datasets are built: they capture the Ray Data context they are made in.
    deterministic = config.train.deterministic
    dataset_config = ray_data_context_for_training(
        config.train.num_workers, config.train.cpus_per_worker, preserve_order=deterministic
    )
    datasets = build_datasets(
        config.data,
        preprocessor,
        training_file_order(files, config),
        shuffle_files=not deterministic,
    )
    return TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "preprocessor": preprocessor.to_dict(),
            "mlflow_run_id": run_id,
            "resume_from": resume_from,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.train.num_workers,
            use_gpu=resolve_use_gpu(config.train, ray.cluster_resources()),
            resources_per_worker={"CPU": config.train.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.train.checkpoints_to_keep
            ),
            callbacks=[EpochLogger(tracking_uri, run_id, tasks), *(callbacks or [])],
            worker_runtime_env=_forwarded_env(),
            # Ray Train's INFO lines repeat every report in full; the epoch line says it once.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=dataset_config,
    )


def finish_run(
    client: Any,
    tracking_uri: str,
    run_id: str,
    config: Config,
    result: ray.train.Result,
    preprocessor: Preprocessor,
    files: list[str],
) -> TrainingOutcome:
    """Log the selected model, its plots and the oracle metrics; return the outcome."""
    with result.checkpoint.as_directory() as folder:
        final = load_checkpoint(folder)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
    model_uri = _log_outputs(client, run_id, config, final, preprocessor, files)
    oracle = oracle_metrics(config.data, files)
    log_metrics(client, run_id, oracle)
    return TrainingOutcome(run_id, tracking_uri, metrics, result.checkpoint.path, model_uri, oracle)


def run_training(config: Config, resume: str | None = None) -> TrainingOutcome:
    """Train `config` (or resume a run) and return the run id and final metrics.

    Args:
        config: the validated training config.
        resume: a checkpoint path or an MLflow run id to continue; the stored config and
            preprocessing are reused, except `train.epochs`, taken from `config`.
    """
    quiet_telemetry()
    uri = resolve_tracking_uri(config.tracking)
    storage = storage_uri(config.train.storage_path)
    state = None
    if resume:
        check_tracking_reachable(uri)
        client = set_tracking(uri)
        run_id, state, name = _resolve_resume(resume, client)
        stored = parse_config(state.config, source="checkpoint config")
        config = stored.model_copy(
            update={"train": stored.train.model_copy(update={"epochs": config.train.epochs})}
        )
        storage = client.get_run(run_id).data.tags.get(TAG_STORAGE, storage)
    # Every data check runs before Ray starts and before the MLflow run exists; the
    # preprocessor's fit is the one pass over the rows (NaN/inf, label values).
    files = check_data(config, uri)
    if state is not None:
        preprocessor = Preprocessor.from_dict(state.preprocessor)
    else:
        preprocessor = fit_preprocessor(config.data, files)
    check_cluster(uri, storage)
    if state is None:
        client = set_tracking(uri)
        tags = {"adatt.git_commit": _git_commit(), "adatt.model": config.model.name}
        run_id = start_run(client, config, uri, tags=tags)
        name = f"adatt-{run_id}"
        client.set_tag(run_id, TAG_STORAGE, storage)
        client.set_tag(run_id, TAG_RAY_RUN, name)

    try:
        with terminate_as_interrupt(), run_lifecycle(client, run_id):
            trainer = make_trainer(
                config,
                preprocessor,
                files,
                run_id=run_id,
                tracking_uri=uri,
                name=name,
                storage=storage,
                resume_from=resume if resume and Path(resume).exists() else None,
            )
            result = trainer.fit()
            return finish_run(client, uri, run_id, config, result, preprocessor, files)
    except KeyboardInterrupt:
        print(
            f"interrupted: MLflow run {run_id} marked KILLED; continue it from its last "
            f"checkpoint with: adatt train --config <config> --resume {run_id}",
            file=sys.stderr,
            flush=True,
        )
        raise


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interrupt so that the run ends as KILLED, not FAILED."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM (e.g. `kill`, a scheduler's stop) raises `Terminated`.

    Ray's `ray.init` installs a SIGTERM handler that calls `sys.exit`, which would mark the
    run FAILED; a stop is not a failure. Only the main thread can handle signals: elsewhere
    (e.g. a Tune trial thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except KeyboardInterrupt as err:
        # Raised inside `ray.get`, the handler's exception comes back as a plain
        # KeyboardInterrupt; the flag still tells a SIGTERM from a Ctrl-C.
        if received and not isinstance(err, Terminated):
            raise Terminated(f"signal {received[0]}") from err
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _forwarded_env() -> dict[str, Any] | None:
    """Pass the fault-injection test hook (see `pipeline/faults.py`) to the workers."""
    fault = os.environ.get(FAULT_ENV)
    return {"env_vars": {FAULT_ENV: fault}} if fault else None


def resolve_use_gpu(train: TrainConfig, cluster: Mapping[str, float]) -> bool:
    """Whether the workers train on GPUs: `train.use_gpu`, where `auto` means "when the
    cluster's resources (`ray.cluster_resources()`) hold at least one GPU"."""
    if train.use_gpu == "auto":
        return cluster.get("GPU", 0.0) >= 1
    return bool(train.use_gpu)


def _log_outputs(
    client: Any,
    run_id: str,
    config: Config,
    final: TrainingState,
    preprocessor: Preprocessor,
    files: list[str],
) -> str | None:
    """Log the selected model (scoring raw rows) and the fusion-weight heatmaps."""
    schema = config.data.feature_schema()
    network = build_model(config.model, schema)
    network.load_state_dict(final.model)
    network.eval()
    example = raw_example(config.data, files)
    log_fusion_plots(client, run_id, network, preprocessor, example)
    if not config.tracking.log_model:
        return None
    task_types = [(t.name, t.type) for t in config.data.tasks]
    return log_scoring_model(
        run_id,
        network,
        config.model.model_dump(mode="json"),
        schema,
        task_types,
        preprocessor,
        example.head(5),
    )
