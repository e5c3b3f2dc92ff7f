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

from bench import harness

# The helpers the benches share with the tests, re-exported for the tests' imports.
from bench.harness import (  # noqa: F401
    REPO_ROOT,
    TINY_OVERRIDES,
    by_epoch,
    free_port,
    log_untrained_run,
    stop_group,
    tiny_config,
)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Every Ray instance the suite starts keeps up to 8 idle workers per node for 10 minutes
# (Ray's defaults: as many as the node has CPUs, 1 here, killed after 1 s idle). A training
# then finds warm processes for its actors and read tasks instead of starting a Python
# process for each: about 10 s less per tiny training after the first on 2 cores
# (measured: 44 s -> 33 s). The runs themselves do not change.
os.environ.setdefault("RAY_num_workers_soft_limit", "8")
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "600000")
# Ray Train's controller takes a worker's report when it polls the workers, every 2 s by
# default, and a worker's next report waits until the last one was taken (a queue of one).
# A real run reports every `train.log_every` (30 s); the suite's tiny runs report every few
# steps (checkpoints every 3, validations every 5), so each report waited up to 2 s: an
# epoch of 21 steps with 7 checkpoints took 16 s, 3 s with a 0.2 s poll (measured). The
# runs themselves do not change.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Ray workers import the project from the checkout even when it is not pip-installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
)


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
        stop_group(server)
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests of the `ray start` cluster (`ray_head`) first, before the session's
    in-process cluster (`ray_cluster`) exists: with both on one machine, Ray 2.60's job
    server of the first ran a job on the second's node (its runtime env and its Python)."""
    items.sort(key=lambda item: "ray_head" not in getattr(item, "fixturenames", ()))


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


@pytest.fixture(scope="session")
def mlflow_server(s3: S3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend) whose artifacts go to the S3
    endpoint (`--artifacts-destination s3://...`); its URI."""
    with harness.mlflow_server(tmp_path_factory.mktemp("mlflow-server"), s3.uri("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="session")
def s3_logs(s3: S3, tiny_logs: Path) -> str:
    """`tiny_logs` in S3: their folder's URI."""
    return s3.upload(tiny_logs, "logs")


# On top of TINY_OVERRIDES (2 epochs, 2 workers): the same data order and seeds on every run.
SERVED_OVERRIDES = ["train.deterministic=true", "train.placement_strategy=SPREAD"]


@pytest.fixture(scope="session")
def served_training(ray_cluster, s3, s3_logs, mlflow_server, tmp_path_factory):
    """The suite's one plain training, where users run it: logs and checkpoints in S3,
    tracked on `mlflow_server` (artifacts in S3), its 2 workers spread over the two nodes,
    2 epochs, deterministic (`SERVED_OVERRIDES`: the undisturbed reference of the node-loss
    test): (config, TrainingOutcome). Tests of the run itself, of the model it logs and of
    everything downstream (register, predict, evaluate, retrain) share it."""
    from pipeline.training.driver import run_training

    config = tiny_config(
        s3_logs,
        tmp_path_factory.mktemp("served"),
        f"train.storage_path={s3.uri('runs')}",
        f"tracking.tracking_uri={mlflow_server}",
        *SERVED_OVERRIDES,
    )
    return config, run_training(config)


@pytest.fixture(scope="session")
def untrained_run(mlflow_server, tiny_logs, tmp_path_factory):
    """`log_untrained_run` on `mlflow_server`."""
    return log_untrained_run(mlflow_server, tiny_logs, tmp_path_factory.mktemp("untrained"))
