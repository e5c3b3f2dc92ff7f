"""Shared fixtures: one local Ray cluster per test session (2 CPUs, like CI), tiny synthetic
logs, and a tiny training config built from `configs/synthetic.yaml`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Ray workers import the project from the checkout even when it is not pip-installed.
REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
)

TINY_OVERRIDES = [
    "model.expert_dims=[16, 8]",
    "model.tower_dims=[8]",
    "model.experts_per_task=2",
    "model.shared_experts=1",
    "train.epochs=2",
    "train.num_workers=2",
    "train.threads_per_worker=1",
    "train.lr=0.01",
    "data.batch_size=256",
]


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray cluster shared by every test that needs one."""
    import ray

    if ray.is_initialized():  # an earlier test's `adatt train` already started one
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 6,000 synthetic interaction-log rows."""
    from pipeline.datasets.synthetic import generate_logs

    out = tmp_path_factory.mktemp("logs")
    generate_logs(out, rows=6000, seed=0)
    return out


def tiny_config(logs: Path, workdir: Path, *overrides: str):
    """The synthetic config shrunk for tests; MLflow and checkpoints under `workdir`."""
    from pipeline.config import load_config

    return load_config(
        REPO_ROOT / "configs" / "synthetic.yaml",
        [
            f"data.path={logs}",
            f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db",
            f"train.storage_path={workdir}/runs",
            *TINY_OVERRIDES,
            *overrides,
        ],
    )


def registry_client(uri: str):
    """A client of the runs and the registry at `uri`. `MlflowClient(uri)` alone takes its
    registry from the process's tracking URI when made, which an earlier test may have
    pointed at another store."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri, registry_uri=uri)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, local artifact store); its URI."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)),
        *("--workers", "1", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db"),
        *("--artifacts-destination", str(folder / "artifacts")),
    ]
    log = (folder / "server.log").open("w")
    # Its own session: the server's worker processes are stopped with it.
    # No job runner: its worker processes (for GenAI jobs) only compete for the 2 CPUs.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not start: {(folder / 'server.log').read_text()}"
                )
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture(scope="session")
def served_training(ray_local, tiny_logs, mlflow_server, tmp_path_factory):
    """One tiny 1-epoch training tracked on `mlflow_server`: (config, TrainingOutcome)."""
    from pipeline.training.driver import run_training

    config = tiny_config(
        tiny_logs,
        tmp_path_factory.mktemp("served"),
        f"tracking.tracking_uri={mlflow_server}",
        "train.epochs=1",
    )
    return config, run_training(config)


def log_untrained_run(tracking_uri: str, logs: Path, workdir: Path, weights=None):
    """A run made without Ray: an untrained tiny network (seed 0; or `weights`) with fitted
    preprocessing, logged as the scoring model, with its real validation metrics logged as
    `best/val/...` the way a training run logs its selected epoch's."""
    from types import SimpleNamespace

    import torch

    from models import build_model
    from pipeline.data.fit import fit_preprocessor
    from pipeline.data.sample import raw_example, read_split
    from pipeline.data.validate import check_schema
    from pipeline.serving.scoring import log_scoring_model
    from pipeline.tracking.runs import log_metrics, set_tracking, start_run
    from pipeline.training.metrics import MultiTaskMetrics, TaskKind

    config = tiny_config(logs, workdir, f"tracking.tracking_uri={tracking_uri}")
    files = check_schema(config.data)
    preprocessor = fit_preprocessor(config.data, files)
    torch.manual_seed(0)
    network = build_model(config.model, config.data.feature_schema()).eval()
    if weights is not None:
        network.load_state_dict(weights)
    client = set_tracking(tracking_uri)
    tags = {"adatt.git_commit": "0" * 40, "adatt.model": config.model.name}
    run_id = start_run(client, config, tracking_uri, tags=tags)
    tasks = [(t.name, t.type) for t in config.data.tasks]
    example = raw_example(config.data, files).head(5)
    model_uri = log_scoring_model(
        run_id,
        network,
        config.model.model_dump(mode="json"),
        config.data.feature_schema(),
        tasks,
        preprocessor,
        example,
    )
    rows = read_split(config.data, files, "validation", config.data.columns()).to_pandas()
    batch = {k: torch.from_numpy(v) for k, v in preprocessor.transform(rows).items()}
    metrics = MultiTaskMetrics([TaskKind(*t) for t in tasks], torch.device("cpu"))
    with torch.no_grad():
        metrics.update(network(batch), batch["labels"], batch["mask"])
    log_metrics(client, run_id, {f"best/{k}": v for k, v in metrics.compute("val").items()})
    client.set_terminated(run_id)
    return SimpleNamespace(
        config=config,
        run_id=run_id,
        model_uri=model_uri,
        network=network,
        preprocessor=preprocessor,
        tasks=tasks,
        files=files,
    )


@pytest.fixture(scope="session")
def untrained_run(mlflow_server, tiny_logs, tmp_path_factory):
    """`log_untrained_run` on `mlflow_server`."""
    return log_untrained_run(mlflow_server, tiny_logs, tmp_path_factory.mktemp("untrained"))
