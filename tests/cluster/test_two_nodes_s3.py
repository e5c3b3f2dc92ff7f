"""Where users run it: the session's two-node Ray cluster and S3 endpoint (moto's server),
checked through the real processes. Placement on both nodes, no secret in anything a run
records or prints, the product beside another Ray cluster on the same machine, and a dead
head in Ray's address file.

(Object storage is exercised by the suite's shared training, `served_training`, with its
logs and checkpoints in S3 and its MLflow artifacts in S3, and by the tests built on it:
predict, evaluate, register, warm start, the daily retrain; resume from S3 and node loss
are in `tests/pipeline/training/test_reliability_e2e.py`, the search in
`tests/tune/test_search_e2e.py`.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bench.harness import split_metrics, untrained_network
from pipeline.tracking import tags
from tests.conftest import (
    FAKE_AWS_SECRET,
    REPO_ROOT,
    TINY_OVERRIDES,
    by_epoch,
    registry_client,
    tiny_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_train_workers_and_read_tasks_ran_on_both_nodes(served_training, ray_cluster) -> None:
    from ray.util.state import list_actors, list_tasks

    config, _ = served_training
    assert str(config.data.path).startswith("s3://")
    assert config.train.storage_path.startswith("s3://")
    nodes = ray_cluster.node_ids()
    assert len(nodes) == 2
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000)
    assert {w.node_id for w in workers} == nodes, workers
    reads = list_tasks(filters=[("name", "=", "MapBatches(_read_unit)")], limit=10_000)
    assert reads and {t.node_id for t in reads} == nodes, {t.node_id for t in reads}


def test_no_secret_in_params_tags_or_ray_logs(served_training, mlflow_server, ray_cluster):
    _, outcome = served_training
    run = registry_client(mlflow_server).get_run(outcome.run_id)
    texts = [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
    assert run.data.params["data.path"].startswith("s3://")
    assert not [t for t in texts if FAKE_AWS_SECRET in t]
    logs = Path(ray_cluster.cluster.head_node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert len(files) > 10  # the raylets', the workers', the jobs' logs
    leaked = [p for p in files if FAKE_AWS_SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked


def _adatt(*args: str, env: dict, cwd: Path, timeout: float = 420) -> subprocess.CompletedProcess:
    return _finish(_start(*args, env=env, cwd=cwd), timeout)


def _start(*args: str, env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 420) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def untrained_test_metrics(config) -> dict[str, float]:
    """The test-split metrics of `config`'s network before any step."""
    from pipeline.data.fit import fit_preprocessor
    from pipeline.data.validate import check_schema

    files = check_schema(config.data)
    network = untrained_network(config, config.train.seed)
    return split_metrics(config, network, fit_preprocessor(config.data, files), files, "test")


def _beside(tiny_logs: Path, tmp_path: Path) -> tuple[dict, str, Callable[[str], list[str]]]:
    """The environment without RAY_ADDRESS, the config, and the overrides of one store."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def common(store: str) -> list[str]:
        return [
            f"data.path={tiny_logs}",
            f"tracking.tracking_uri=sqlite:///{tmp_path}/{store}.db",
            f"train.storage_path={tmp_path}/{store}-runs",
            *TINY_OVERRIDES,  # 2 epochs, 2 workers
        ]

    return env, str(REPO_ROOT / "configs" / "synthetic.yaml"), common


def test_train_and_predict_beside_another_ray_cluster(ray_cluster, tiny_logs, tmp_path) -> None:
    """Without RAY_ADDRESS each command starts a fresh local Ray instance of its own, by its
    address, while the session's cluster runs on the same machine. Both kinds of Ray helper
    that used to guess the address from the machine's processes (Train's placement-group
    cleaner, the state API) find their own. (Three instances at once, with a search beside
    the training, is the long tier's `test_train_and_tune_at_once_beside_another_ray_cluster`.)

    The training is also the end-to-end check of gradient-level task balancing: UPGrad on
    2 DDP workers (the loss falls, the test log losses are those of a model that learned)."""
    env, config, common = _beside(tiny_logs, tmp_path)
    balanced = [*common("train"), "train.loss_weighting=upgrad"]
    trained = _adatt("train", "-c", config, *_sets(*balanced), env=env, cwd=tmp_path)

    assert trained.returncode == 0, trained.stderr[-3000:]
    run_id = trained.stdout.split("MLflow run: ", 1)[1].split()[0]
    assert "Found multiple active Ray instances" not in trained.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/train.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.loss_weighting"] == "upgrad"
    assert run.data.params["train.num_workers"] == "2"
    losses = by_epoch(client, run_id, "train/loss")
    assert sorted(losses) == [1, 2]
    assert losses[2] < losses[1]
    # The model learned: on every task its test log loss is below that of the network it
    # started from (same seed, same rows, scored here without Ray). A test AUC above 0.5
    # was a coin toss after 2 epochs of 6,000 rows (0.4972 once); this margin is wide.
    before = untrained_test_metrics(tiny_config(tiny_logs, tmp_path, *balanced))
    for task in ("click", "like", "share"):
        key = f"test/{task}/logloss"
        print(f"{key}: {run.data.metrics[key]:.4f} trained, {before[key]:.4f} untrained")
        assert run.data.metrics[key] < before[key], task

    scores = tmp_path / "scores"
    predicted = _adatt(
        *("predict", "--model", f"runs:/{run_id}/model", "--input", str(tiny_logs)),
        *("--output", str(scores), "--tracking-uri", f"sqlite:///{tmp_path}/train.db"),
        env=env,
        cwd=tmp_path,
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert "scored 6,000 rows" in predicted.stdout and (scores / "_SUCCESS").is_file()
    for done in (trained, predicted):  # the console shows no secret
        assert FAKE_AWS_SECRET not in done.stdout + done.stderr
        assert "Execution plan of Dataset" not in done.stdout + done.stderr
        assert "Progress bars disabled" not in done.stdout + done.stderr


@pytest.mark.long
def test_train_and_tune_at_once_beside_another_ray_cluster(
    ray_cluster, tiny_logs, tmp_path
) -> None:
    """`train` and `tune` at the same time beside the session's cluster: three Ray instances
    at once, each command on its own. The search's one trial picks a gradient-balancing
    method as a Tune categorical."""
    env, config, common = _beside(tiny_logs, tmp_path)
    spec = tmp_path / "tune.yaml"
    spec.write_text(
        f"base: {config}\n"
        "search:\n  train.loss_weighting: {choice: [pcgrad, mgda, imtl_g]}\n"
        "tune: {searcher: random, num_samples: 1, scheduler: {type: none}}\n"
    )
    training = _start("train", "-c", config, *_sets(*common("train")), env=env, cwd=tmp_path)
    tuning = _start(
        "tune", "-c", str(spec), *_sets(*common("tune"), "train.epochs=1"), env=env, cwd=tmp_path
    )
    trained, tuned = _finish(training), _finish(tuning)

    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "Found multiple active Ray instances" not in trained.stderr
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert "best trial" in tuned.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/tune.db")
    experiment = client.get_experiment_by_name("adatt").experiment_id
    (trial,) = [r for r in client.search_runs([experiment]) if tags.PARENT in r.data.tags]
    assert trial.info.status == "FINISHED"
    assert trial.data.params["train.loss_weighting"] in {"pcgrad", "mgda", "imtl_g"}
    assert 0.0 < trial.data.metrics["val/mean_auc"] < 1.0
    for done in (trained, tuned):
        assert FAKE_AWS_SECRET not in done.stdout + done.stderr


def test_a_dead_head_in_the_address_file_fails_fast_naming_it(
    served_training, mlflow_server, tiny_logs, tmp_path
) -> None:
    """`ray start` leaves its address in Ray's address file; once that head is dead,
    RAY_ADDRESS=auto stops within seconds with one line naming the address (Ray itself
    would retry the dead GCS for minutes); without RAY_ADDRESS the file is never read."""
    _, outcome = served_training
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # nothing listens
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path), "RAY_ADDRESS": "auto"}
    started = time.monotonic()
    done = _adatt(
        *("predict", "--model", outcome.model_uri, "--input", str(tiny_logs)),
        *("--output", str(tmp_path / "out"), "--tracking-uri", mlflow_server),
        env=env,
        cwd=tmp_path,
    )
    assert time.monotonic() - started < 30
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: RAY_ADDRESS=auto (127.0.0.1:9, from ")
    assert "does not answer" in errors[0] and "unset RAY_ADDRESS" in errors[0]
    assert not (tmp_path / "out").exists()
