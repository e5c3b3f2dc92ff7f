"""`adatt register` against a real MLflow server: tags, aliases, promote-if-better.

The best trial of `adatt tune` is registered the same way: it is a run id whose run logged
the scoring model, so plain training runs stand for it here.
"""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import InputError
from pipeline.registry import check_metric, lower_is_better, register_run, schema_hash

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _register(*args: str):
    return CliRunner().invoke(app, ["register", *args], catch_exceptions=False)


def test_metric_direction_and_choice() -> None:
    assert lower_is_better("val/mean_ne") and lower_is_better("best/val/watch_time/mse")
    assert not lower_is_better("val/mean_auc") and not lower_is_better("val/click/auc")
    check_metric("val/click/logloss")
    with pytest.raises(InputError, match="validation metric"):
        check_metric("test/mean_auc")
    with pytest.raises(InputError, match="not a metric that ranks"):
        check_metric("val/click/calibration")


def test_register_tags_and_promote_if_better(served_training, weak_training, mlflow_server):
    config, good = served_training
    _, weak = weak_training
    client = MlflowClient(mlflow_server)
    good_metrics = client.get_run(good.run_id).data.metrics
    weak_metrics = client.get_run(weak.run_id).data.metrics
    # The premise of the test: the lr=1e-6 run is worse on both metrics.
    assert good_metrics["best/val/mean_auc"] > weak_metrics["best/val/mean_auc"]
    assert good_metrics["best/val/mean_ne"] < weak_metrics["best/val/mean_ne"]
    url = ["--tracking-uri", mlflow_server, "--name", "reg-test"]

    # 1. The weak run gets @champion unconditionally.
    first = _register("--run", weak.run_id, *url)
    assert first.exit_code == 0, first.output
    assert "registered reg-test version 1" in first.stdout and "@champion -> 1" in first.stdout
    version = client.get_model_version("reg-test", "1")
    assert version.tags["data_schema_hash"] == schema_hash(config.data.model_dump(mode="json"))
    run_tags = client.get_run(weak.run_id).data.tags
    assert version.tags["git_commit"] == run_tags["adatt.git_commit"] != "unknown"
    assert version.tags["model_family"] == "adatt" and version.tags["run_id"] == weak.run_id
    assert float(version.tags["best/val/mean_auc"]) == pytest.approx(
        weak_metrics["best/val/mean_auc"], rel=1e-5
    )
    assert "test/click/auc" in version.tags

    # 2. The good run beats it on AUC (higher is better): the alias moves.
    second = register_run(client, good.run_id, "reg-test", "champion", "val/mean_auc")
    assert (second.version, second.promoted, second.holder) == ("2", True, "2")
    assert "version 2 wins, @champion -> 2" in second.message
    assert f"{good_metrics['best/val/mean_auc']:.6g}" in second.message
    assert client.get_model_version_by_alias("reg-test", "champion").version == "2"

    # 3. The weak run again, on NE (lower is better): a new version, the alias stays.
    third = _register("--run", weak.run_id, *url, "--promote-if-better", "val/mean_ne")
    assert third.exit_code == 0, third.output
    assert "version 3" in third.stdout and "lower is better" in third.stdout
    assert "version 2 wins, @champion stays" in third.stdout
    assert client.get_model_version_by_alias("reg-test", "champion").version == "2"
    assert client.get_model_version("reg-test", "3").run_id == weak.run_id


def test_bad_register_inputs_exit_2(served_training, mlflow_server) -> None:
    _, good = served_training
    url = ["--tracking-uri", mlflow_server, "--name", "reg-bad"]
    missing = _register("--run", "0123456789abcdef0123456789abcdef", *url)
    assert missing.exit_code == 2 and "no such MLflow run" in missing.stderr
    leak = _register("--run", good.run_id, *url, "--promote-if-better", "test/mean_auc")
    assert leak.exit_code == 2 and "validation metric" in leak.stderr
    unknown = _register("--run", good.run_id, *url, "--promote-if-better", "val/nope/auc")
    assert unknown.exit_code == 2 and "has no such metric" in unknown.stderr
    assert MlflowClient(mlflow_server).search_registered_models("name = 'reg-bad'") == []
