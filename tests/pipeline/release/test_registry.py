"""`adatt register` against a real MLflow server: tags, aliases, promote-if-better.

The best trial of `adatt tune` is registered the same way: it is a run id whose run logged
the scoring model, so plain runs stand for it here (one tiny training, and one run of an
untrained network logged without Ray).
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.modelfile.format import schema_hash
from pipeline.release.registry import register_run
from tests.conftest import registry_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _register(*args: str):
    return CliRunner().invoke(app, ["register", *args], catch_exceptions=False)


def test_schema_hash_covers_inputs_and_task_outputs_only() -> None:
    data = {
        "categorical": [{"column": "user_id", "buckets": 100, "dim": 16}],
        "dense": [],
        "multi_hot": [],
        "tasks": [{"name": "click", "label": None, "type": "binary", "weight": 1.0}],
    }
    base = schema_hash(data)
    how_trained = {**data, "group_column": "user_id", "batch_size": 7}
    how_trained["tasks"] = [{**data["tasks"][0], "weight": 0.5, "group_column": "user_id"}]
    assert schema_hash(how_trained) == base
    assert schema_hash({**data, "tasks": [{"name": "click", "label": "click"}]}) == base
    wider = {**data, "categorical": [{"column": "user_id", "buckets": 200, "dim": 16}]}
    assert schema_hash(wider) != base
    regression = {**data, "tasks": [{"name": "click", "type": "regression"}]}
    assert schema_hash(regression) != base


def test_register_tags_and_promote_if_better(served_training, untrained_run, mlflow_server):
    config, trained = served_training
    client = registry_client(mlflow_server)
    runs = [trained.run_id, untrained_run.run_id]
    metrics = {r: client.get_run(r).data.metrics for r in runs}
    # Which run is better depends on a tiny 2-epoch training: order them by their values.
    high, low = sorted(runs, key=lambda r: metrics[r]["best/val/mean_auc"], reverse=True)
    assert metrics[high]["best/val/mean_auc"] > metrics[low]["best/val/mean_auc"]
    url = ["--tracking-uri", mlflow_server, "--name", "reg-test"]

    # 1. Without --promote-if-better the alias moves unconditionally.
    first = _register("--run", low, *url)
    assert first.exit_code == 0, first.output
    assert f"registered reg-test version 1 (run {low}); @champion -> 1" in first.stdout
    version = client.get_model_version("reg-test", "1")
    assert version.tags["data_schema_hash"] == schema_hash(config.data.model_dump(mode="json"))
    assert version.tags["git_commit"] == client.get_run(low).data.tags["adatt.git_commit"]
    assert version.tags["model_family"] == "adatt" and version.tags["run_id"] == low
    assert float(version.tags["best/val/mean_auc"]) == pytest.approx(
        metrics[low]["best/val/mean_auc"], rel=1e-5
    )
    trained_tags = client.get_run(trained.run_id).data.tags
    assert (
        len(trained_tags["adatt.git_commit"]) == 40 and "test/click/auc" in metrics[trained.run_id]
    )

    # 2. Higher AUC wins: the alias moves to the new version.
    second = register_run(client, high, "reg-test", "champion", "val/mean_auc")
    assert (second.version, second.promoted, second.holder) == ("2", True, "2")
    assert "(higher is better); version 2 wins, @champion -> 2" in second.message
    assert f"= {metrics[high]['best/val/mean_auc']:.6g} vs @champion version 1" in second.message
    assert client.get_model_version_by_alias("reg-test", "champion").version == "2"
    hashes = {client.get_model_version("reg-test", v).tags["data_schema_hash"] for v in "12"}
    assert len(hashes) == 1  # same data config, same hash

    # 3. The other run again, on NE (lower is better): always a new version; the alias
    # follows the values.
    third = _register("--run", low, *url, "--promote-if-better", "val/mean_ne")
    assert third.exit_code == 0, third.output
    moves = metrics[low]["best/val/mean_ne"] < metrics[high]["best/val/mean_ne"]
    winner = "3" if moves else "2"
    assert "registered reg-test version 3" in third.stdout and "(lower is better)" in third.stdout
    assert f"version {winner} wins, @champion {'-> 3' if moves else 'stays'}" in third.stdout
    assert client.get_model_version_by_alias("reg-test", "champion").version == winner
    assert client.get_model_version("reg-test", "3").run_id == low


def test_bad_register_inputs_exit_2(served_training, mlflow_server) -> None:
    _, good = served_training
    url = ["--tracking-uri", mlflow_server, "--name", "reg-bad"]
    missing = _register("--run", "0123456789abcdef0123456789abcdef", *url)
    assert missing.exit_code == 2 and "no such MLflow run" in missing.stderr
    leak = _register("--run", good.run_id, *url, "--promote-if-better", "test/mean_auc")
    assert leak.exit_code == 2 and "validation metric" in leak.stderr
    unknown = _register("--run", good.run_id, *url, "--promote-if-better", "val/nope/auc")
    assert unknown.exit_code == 2 and "has no such metric" in unknown.stderr
    assert registry_client(mlflow_server).search_registered_models("name = 'reg-bad'") == []
