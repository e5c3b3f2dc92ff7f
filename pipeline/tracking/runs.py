"""MLflow tracking: where runs go, their lifecycle, params and metrics. MLflow only, no Ray:
`adatt register` and `adatt predict` use it without starting Ray Train (the per-epoch
logging callback that runs under Ray Train is `pipeline.training.callbacks.RunLogger`).
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from pipeline.config import Config, TrackingConfig
from pipeline.errors import ConfigError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
STEP_KEY = "global_step"  # logged with every report of a training, at its own step


def quiet_telemetry() -> None:
    """Turn off MLflow and Ray usage telemetry, and MLflow's per-file download bars, for this
    process and the ones it starts."""
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def resolve_tracking_uri(tracking: TrackingConfig) -> str:
    """Config, else MLFLOW_TRACKING_URI, else local SQLite; relative SQLite paths made absolute
    because Ray processes do not share the driver's working directory."""
    uri = tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def artifact_root_for(uri: str) -> str | None:
    """Local artifact folder beside a SQLite store (`mlartifacts/`); None for servers."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None


def check_tracking_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, naming `tracking.tracking_uri`, if the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
                if r.status != 200:
                    raise OSError(f"HTTP {r.status}")
        except (OSError, urllib.error.URLError) as err:
            raise ConfigError(
                f"tracking.tracking_uri: MLflow server {uri} is unreachable "
                f"({getattr(err, 'reason', err)}); start it or fix the URI"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(f"tracking.tracking_uri: {folder} is not a writable folder")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> {"train.lr": "0.001", ...} for MLflow params."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)
    return out


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The experiment id for `name`, created (with a local artifact root) if needed."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root_for(uri))


# MLflow's limits: 100 params per batch, 6,000 characters per param value.
PARAMS_PER_BATCH = 100
PARAM_VALUE_CHARS = 6000


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    """Log params in batches of MLflow's maximum size, values cut to its maximum length."""
    items = [Param(k, str(v)[:PARAM_VALUE_CHARS]) for k, v in params.items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + PARAMS_PER_BATCH])


def start_run(client: MlflowClient, config: Config, uri: str, tags: dict[str, str]) -> str:
    """Create the training run with every config field as a param; return its id."""
    experiment_id = ensure_experiment(client, config.tracking.experiment, uri)
    run = client.create_run(experiment_id, run_name=config.tracking.run_name, tags=tags)
    log_params(client, run.info.run_id, flatten(config.model_dump(mode="json")))
    client.log_dict(run.info.run_id, config.model_dump(mode="json"), "config.yaml")
    return run.info.run_id


def logged_steps(client: MlflowClient, run_id: str) -> set[int]:
    """The global steps whose reports are already in the run."""
    return {int(m.step) for m in client.get_metric_history(run_id, STEP_KEY)}


@contextmanager
def run_lifecycle(client: MlflowClient, run_id: str) -> Iterator[None]:
    """Mark the run RUNNING, then FINISHED, FAILED (error) or KILLED (interrupt): never left
    RUNNING."""
    client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    try:
        yield
    except KeyboardInterrupt:
        client.set_terminated(run_id, status="KILLED")
        raise
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


def log_metrics(
    client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0
) -> None:
    """Log a dict of metrics in batches of MLflow's maximum size."""
    now = int(time.time() * 1000)
    items = [Metric(k, v, now, step) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def client_for(uri: str) -> MlflowClient:
    """The client of the runs and the registry at `uri`.

    The registry is named explicitly: a client's registry otherwise follows the process's
    tracking URI at the time it is made, which may be another store."""
    return MlflowClient(uri, registry_uri=uri)
