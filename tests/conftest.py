"""Shared fixtures, one of each per test session: a real S3 endpoint (moto's server), a
two-node Ray cluster (2 CPUs in all, like CI), an `mlflow server` whose artifacts go to S3,
tiny synthetic logs (on local disk and in S3), and a tiny training config built from
`configs/synthetic.yaml`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
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


S3_BUCKET = "adatt-test"
# The S3 endpoint's credentials: a secret value no log, param or tag may ever show.
FAKE_AWS_SECRET = "fake-aws-secret-3c7e91d0b2"
NODE_OBJECT_STORE_BYTES = 300 * 2**20


@dataclass(frozen=True)
class S3:
    """The session's S3 endpoint (moto in server mode on 127.0.0.1) and its bucket."""

    endpoint: str
    bucket: str

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def upload(self, folder: Path, prefix: str) -> str:
        """Copy a local folder's files under `prefix`; the folder's URI."""
        import pyarrow.fs as pafs

        pafs.copy_files(str(folder), f"{self.bucket}/{prefix}", destination_filesystem=s3_fs())
        return self.uri(prefix)


def s3_fs():
    """pyarrow's S3 filesystem, configured from the environment (AWS_ENDPOINT_URL, ...), as
    the product gets it: through `FileSystem.from_uri` (the `S3FileSystem()` constructor
    does not read AWS_ENDPOINT_URL)."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(f"s3://{S3_BUCKET}")[0]


def _wait_http(url: str, proc, log: Path, timeout_s: float = 120) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up: {log.read_text()[-3000:]}")
        time.sleep(0.3)


def _stop(proc) -> None:
    import signal
    import subprocess

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """A real S3 API on 127.0.0.1 (`moto` in server mode, its own process) with one bucket.

    Endpoint and credentials reach every client the way they would in production: the
    standard AWS variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), which pyarrow,
    boto3, MLflow and the Ray nodes started after this fixture all read.
    """
    import subprocess
    import sys

    import boto3

    folder = tmp_path_factory.mktemp("s3")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = folder / "moto.log"
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(
        command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": FAKE_AWS_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _wait_http(f"{endpoint}/moto-api/", server, log)
        boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
        yield S3(endpoint, S3_BUCKET)
    finally:
        _stop(server)
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class TwoNodes:
    """The session's Ray cluster: a head and a worker node on this machine, each with its
    own raylet and object store (Ray's own multi-node test harness)."""

    cluster: object
    address: str
    worker: object

    def node_ids(self) -> set[str]:
        import ray

        return {n["NodeID"] for n in ray.nodes() if n["Alive"]}

    def replace_worker(self) -> None:
        """Remove the worker node (its raylet and every process on it), then add a fresh
        one, as an autoscaler replaces a lost machine."""
        self.cluster.remove_node(self.worker, allow_graceful=False)
        self.worker = self.cluster.add_node(**_node_args())
        self.cluster.wait_for_nodes()


def _node_args() -> dict:
    return {"num_cpus": 1, "object_store_memory": NODE_OBJECT_STORE_BYTES}


@pytest.fixture(scope="session")
def ray_cluster(s3: S3) -> Iterator[TwoNodes]:
    """Two Ray nodes on this machine (1 CPU each: 2 in all, like CI), shared by every test
    that needs Ray; the test process is a driver connected to it.

    Started with `ray.cluster_utils.Cluster`. Its address is put in `RAY_ADDRESS` before any
    node starts, so every process of every job names this cluster (other Ray instances may
    run beside it). Both nodes share this machine's disk, so local storage counts as shared
    (`ADATT_SHARED_STORAGE`); the object-storage tests use S3.
    """
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.session import start_ray

    if ray.is_initialized():  # a test started its own instance: this cluster replaces it
        ray.shutdown()
    import ray.util

    port = free_port()
    address = f"{ray.util.get_node_ip_address()}:{port}"  # the IP Ray gives its nodes
    os.environ["RAY_ADDRESS"] = address
    os.environ["ADATT_SHARED_STORAGE"] = "1"
    head = {
        **_node_args(),
        "gcs_server_port": port,
        "include_dashboard": True,  # the state API (which node ran what) needs it
        "dashboard_host": "127.0.0.1",
        "dashboard_port": free_port(),
    }
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        worker = cluster.add_node(**_node_args())
        cluster.wait_for_nodes()
        start_ray()  # the product's own way to join a cluster by its address
        yield TwoNodes(cluster, address, worker)
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        os.environ.pop("ADATT_SHARED_STORAGE", None)


@pytest.fixture(scope="session")
def tiny_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 6,000 synthetic interaction-log rows."""
    from pipeline.datasets.synthetic import generate_logs

    out = tmp_path_factory.mktemp("logs")
    generate_logs(out, rows=6000, seed=0)
    return out


def tiny_config(logs: Path | str, workdir: Path, *overrides: str):
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


def corrupt_column_pages(path: Path, column: str) -> None:
    """Garbage over one column chunk's first page header; the footer stays readable."""
    import pyarrow.parquet as pq

    md = pq.read_metadata(path)
    index = md.schema.names.index(column)
    chunk = md.row_group(0).column(index)
    offset = chunk.dictionary_page_offset or chunk.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 24] = b"\xff" * 24
    path.write_bytes(bytes(raw))


def registry_client(uri: str):
    """A client of the runs and the registry at `uri`. `MlflowClient(uri)` alone takes its
    registry from the process's tracking URI when made, which an earlier test may have
    pointed at another store."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri, registry_uri=uri)


def register_version(client, name: str, run) -> str:
    """Register `run`'s logged model (`run.model_uri`, `models:/m-...`) as a new version of
    `name`, as `adatt register` does: by its artifact location (MLflow's SQL registry
    resolves a `models:/` source with the process's tracking URI, not the client's)."""
    model_id = run.model_uri.removeprefix("models:/")
    location = client.get_logged_model(model_id).artifact_location
    return client.create_model_version(name, location, run_id=run.run_id, model_id=model_id).version


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(s3: S3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend) whose artifacts go to the S3
    endpoint (`--artifacts-destination s3://...`); its URI."""
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
        *("--artifacts-destination", s3.uri("mlflow")),
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
def s3_logs(s3: S3, tiny_logs: Path) -> str:
    """`tiny_logs` in S3: their folder's URI."""
    return s3.upload(tiny_logs, "logs")


@pytest.fixture(scope="session")
def served_training(ray_cluster, s3, s3_logs, mlflow_server, tmp_path_factory):
    """One tiny 1-epoch training where users run it: logs and checkpoints in S3, tracked on
    `mlflow_server` (artifacts in S3), its 2 workers spread over the two nodes:
    (config, TrainingOutcome)."""
    from pipeline.training.driver import run_training

    config = tiny_config(
        s3_logs,
        tmp_path_factory.mktemp("served"),
        f"train.storage_path={s3.uri('runs')}",
        f"tracking.tracking_uri={mlflow_server}",
        "train.epochs=1",
        "train.placement_strategy=SPREAD",
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
    from pipeline.tracking.model_store import log_model
    from pipeline.tracking.runs import client_for, log_metrics, start_run
    from pipeline.training.metrics import MultiTaskMetrics

    config = tiny_config(logs, workdir, f"tracking.tracking_uri={tracking_uri}")
    files = check_schema(config.data)
    preprocessor = fit_preprocessor(config.data, files)
    torch.manual_seed(0)
    network = build_model(config.model, config.data.feature_schema()).eval()
    if weights is not None:
        network.load_state_dict(weights)
    client = client_for(tracking_uri)
    tags = {"adatt.git_commit": "0" * 40, "adatt.model": config.model.name}
    run_id = start_run(client, config, tracking_uri, tags=tags)
    example = raw_example(config.data, files).head(5)
    model_config = config.model.model_dump(mode="json")
    model_uri = log_model(client, run_id, network, model_config, preprocessor, example)
    rows = read_split(config.data, files, "validation", config.data.columns()).to_pandas()
    batch = {k: torch.from_numpy(v) for k, v in preprocessor.transform(rows).items()}
    tasks = [t.model_copy(update={"group_column": None}) for t in config.data.tasks]
    metrics = MultiTaskMetrics(tasks, torch.device("cpu"))
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
