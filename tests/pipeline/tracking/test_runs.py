"""MLflow tracking helpers against a real local SQLite store."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.errors import ConfigError
from pipeline.tracking.runs import (
    check_tracking_reachable,
    flatten,
    resolve_tracking_uri,
    run_lifecycle,
)


def test_relative_sqlite_uri_is_made_absolute(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(TrackingConfig()) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:///x.db")).endswith(
        f"{tmp_path}/x.db"
    )


def test_unreachable_server_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"tracking\.tracking_uri: MLflow server .* unreachable"):
        check_tracking_reachable("http://127.0.0.1:9", timeout_s=2)


def test_flatten_nested_config() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {
        "a.b": "1",
        "a.c.d": "[1, 2]",
        "e": "None",
    }


@pytest.mark.parametrize(
    ("error", "status"), [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")]
)
def test_interrupted_run_is_never_left_running(tmp_path, error, status) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    with pytest.raises(error), run_lifecycle(client, run_id):
        raise error("boom")
    assert client.get_run(run_id).info.status == status
