"""Gradient-level task balancing end to end: `adatt train` with UPGrad on the session's
two-node Ray cluster (2 DDP workers) with real MLflow. `adatt tune` searching the method as
a categorical is in `tests/cluster/test_two_nodes_s3.py` (its search beside another Ray
cluster), so the suite pays for one search, not two."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import REPO_ROOT, TINY_OVERRIDES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _sets(logs: Path, workdir: Path) -> dict[str, object]:
    fixed = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in TINY_OVERRIDES)}
    return {
        **fixed,
        "data.path": str(logs),
        "tracking.tracking_uri": f"sqlite:///{workdir}/mlflow.db",
        "train.storage_path": str(workdir / "runs"),
    }


def test_adatt_train_with_upgrad_on_two_workers(ray_cluster, tiny_logs, tmp_path) -> None:
    sets = {**_sets(tiny_logs, tmp_path), "train.loss_weighting": "upgrad", "train.epochs": 2}
    command = ["train", "-c", str(REPO_ROOT / "configs" / "synthetic.yaml")]
    for key, value in {**sets, "train.num_workers": 2}.items():
        command += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("adatt").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.loss_weighting"] == "upgrad"
    assert run.data.params["train.num_workers"] == "2"
    losses = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in losses] == [1, 2]
    assert losses[1].value < losses[0].value
    for task in ("click", "like", "share"):
        assert 0.5 < run.data.metrics[f"test/{task}/auc"] < 1.0, task
