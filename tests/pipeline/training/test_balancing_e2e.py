"""Gradient-level task balancing end to end: `adatt train` with UPGrad on the session's
two-node Ray cluster (2 DDP workers) with real MLflow. `adatt tune` searching the method as
a categorical is in `tests/cluster/test_two_nodes_s3.py` (its search beside another Ray
cluster), so the suite pays for one search, not two."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import REPO_ROOT, TINY_OVERRIDES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_adatt_train_with_upgrad_on_two_workers(ray_cluster, tiny_logs, tmp_path) -> None:
    # TINY_OVERRIDES train 2 epochs on 2 workers.
    sets = [
        *TINY_OVERRIDES,
        f"data.path={tiny_logs}",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"train.storage_path={tmp_path / 'runs'}",
        "train.loss_weighting=upgrad",
    ]
    command = ["train", "-c", str(REPO_ROOT / "configs" / "synthetic.yaml")]
    for item in sets:
        command += ["--set", item]
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
