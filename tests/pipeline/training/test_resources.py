"""What the workers ask Ray for (`pipeline/training/resources.py`), checked on CPU: the
arithmetic over a cluster's resources, and `adatt train` on a local Ray that declares a GPU
it does not have (`RAY_OVERRIDE_RESOURCES`, as Ray's own tests declare resources), which
must stop with one line before any run exists instead of waiting forever."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.training.resources import plan_workers
from tests.conftest import REPO_ROOT, TINY_OVERRIDES
from tune.search import trial_concurrency


def _train(**fields) -> TrainConfig:
    return TrainConfig(**fields)


@pytest.mark.parametrize(
    ("fields", "cluster", "workers", "gpu_share"),
    [
        ({}, {"CPU": 2.0}, 2, 0.0),  # the default on CPUs: 2 workers of half a CPU
        ({}, {"CPU": 16.0, "GPU": 1.0}, 1, 1.0),  # a one-GPU machine: one worker
        ({}, {"CPU": 64.0, "GPU": 8.0}, 8, 1.0),
        ({"gpus_per_worker": 0.25}, {"CPU": 16.0, "GPU": 1.0}, 4, 0.25),
        ({"num_workers": 2, "gpus_per_worker": 0.5}, {"CPU": 16.0, "GPU": 1.0}, 2, 0.5),
        ({"num_workers": 3}, {"CPU": 16.0, "GPU": 8.0}, 3, 1.0),
        ({"num_workers": 4, "use_gpu": False}, {"CPU": 16.0, "GPU": 1.0}, 4, 0.0),
    ],
)
def test_the_workers_follow_the_cluster(fields, cluster, workers, gpu_share) -> None:
    plan = plan_workers(_train(**fields), cluster)
    assert (plan.num_workers, plan.gpus_per_worker) == (workers, gpu_share)
    assert plan.use_gpu == (gpu_share > 0)
    assert plan.resources() == {"CPU": 0.5, **({"GPU": gpu_share} if gpu_share else {})}


def test_more_gpu_shares_than_gpus_is_one_line_naming_the_fields() -> None:
    with pytest.raises(ConfigError) as err:
        plan_workers(_train(num_workers=2), {"CPU": 16.0, "GPU": 1.0})
    message = str(err.value)
    assert message.startswith("train.num_workers: 2 worker(s) x train.gpus_per_worker 1 need ")
    assert "the cluster has 1" in message and "train.num_workers: auto (1 here)" in message
    assert "train.gpus_per_worker: 0.5" in message and "\n" not in message
    assert "cpus_per_worker" not in message  # a GPU shortage is not a CPU one
    with pytest.raises(ConfigError, match="train.step_mode: cuda_graph .* no GPU"):
        plan_workers(_train(step_mode="cuda_graph"), {"CPU": 16.0})


@pytest.mark.parametrize(
    ("fields", "cluster", "expected"),
    [
        ({"num_workers": 1}, {"CPU": 16.0, "GPU": 1.0}, 1),  # one whole GPU per trial
        ({"num_workers": 1, "gpus_per_worker": 0.25}, {"CPU": 16.0, "GPU": 1.0}, 4),
        ({"num_workers": 2, "gpus_per_worker": 0.5}, {"CPU": 16.0, "GPU": 2.0}, 2),
        ({"num_workers": 1, "gpus_per_worker": 0.1}, {"CPU": 4.0, "GPU": 1.0}, 6),  # CPUs cap
        ({}, {"CPU": 2.0}, 1),
    ],
)
def test_trials_share_gpus_by_their_fraction(fields, cluster, expected) -> None:
    from types import SimpleNamespace

    config = SimpleNamespace(train=_train(**fields))
    assert trial_concurrency(cluster, config, None) == expected


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_on_a_declared_gpu_it_cannot_fill_stops_with_one_line(
    tiny_logs: Path, tmp_path: Path
) -> None:
    """A local Ray that declares one GPU; `train.num_workers: 2` (one GPU each by default):
    exit 2, one line naming the fields, no MLflow store, within a minute (not a run that
    waits forever for a second GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_OVERRIDE_RESOURCES"] = json.dumps({"GPU": 1})
    store = tmp_path / "store"
    store.mkdir()
    sets = [
        f"data.path={tiny_logs}",
        f"tracking.tracking_uri=sqlite:///{store}/mlflow.db",
        f"train.storage_path={tmp_path}/runs",
        *TINY_OVERRIDES,  # 2 workers
    ]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "-c", str(REPO_ROOT / "configs" / "synthetic.yaml")]
        + [arg for item in sets for arg in ("--set", item)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert time.monotonic() - started < 120
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: train.num_workers: 2 worker(s) x train.gpus_per_worker 1 need 2 GPU(s), and "
        "the cluster has 1; set train.num_workers: auto (1 here), or share GPUs with "
        "train.gpus_per_worker: 0.5, or train on CPUs with train.use_gpu: false"
    ]
    assert "Traceback" not in done.stderr
    assert list(store.iterdir()) == [] and not (tmp_path / "runs").exists()
