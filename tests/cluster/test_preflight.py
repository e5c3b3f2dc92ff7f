"""Client-side checks of an `adatt train` job before it is submitted."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.preflight import preflight, train_args
from pipeline.errors import ConfigError

CONFIG = """\
data:
  path: s3://bucket/logs
  dense: [{column: price}]
  tasks: [{name: click}]
train:
  storage_path: s3://bucket/runs
tracking:
  tracking_uri: http://mlflow:5000
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "c.yaml").write_text(CONFIG)
    return tmp_path


def train(*args: str) -> str:
    return " ".join(["python -m pipeline.cli train", *args])


def test_train_args():
    assert train_args(train("--config c.yaml", "--set a=1", "-s", "'b=[1, 2]'")) == (
        "c.yaml",
        ["a=1", "b=[1, 2]"],
    )
    assert train_args(train("--config=c.yaml", "--set=a=1")) == ("c.yaml", ["a=1"])
    assert train_args(train()) == (None, [])
    assert train_args("python -m pipeline.cli tune --config c.yaml") is None
    assert train_args("python -c 'print(1)'") is None
    assert train_args("echo 'unbalanced") is None


def test_not_a_train_command_is_not_checked(project):
    preflight("python -c 'print(1)'", project, remote=True, job_env={})


def test_good_config_passes_locally_and_remotely(project):
    preflight(train("-c configs/c.yaml"), project, remote=False, job_env={})
    preflight(train("-c configs/c.yaml"), project, remote=True, job_env={})


def test_invalid_config_fails_before_submission(project):
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        preflight(train("-c configs/c.yaml --set train.epochs=0"), project, False, {})
    with pytest.raises(ConfigError, match="config file not found"):
        preflight(train("-c configs/missing.yaml"), project, False, {})


def test_relative_paths_are_refused_for_any_cluster(project):
    with pytest.raises(ConfigError) as err:
        preflight(
            train("-c configs/c.yaml --set data.path=data/logs --set train.storage_path=runs"),
            project,
            remote=False,
            job_env={},
        )
    lines = str(err.value).splitlines()
    assert lines[0].startswith("data.path: ['data/logs'] is relative")
    assert lines[1].startswith("train.storage_path: 'runs' is relative")


def test_remote_rules_apply_with_job_env(project):
    local_tracking = train("-c configs/c.yaml --set tracking.tracking_uri=null")
    with pytest.raises(ConfigError, match=r"^tracking\.tracking_uri: not set"):
        preflight(local_tracking, project, remote=True, job_env={})
    # The URI passed through to the job counts.
    preflight(local_tracking, project, True, {"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    preflight(local_tracking, project, remote=False, job_env={})

    local_storage = train("-c configs/c.yaml --set train.storage_path=/home/me/runs")
    with pytest.raises(ConfigError, match=r"^train\.storage_path: '/home/me/runs'"):
        preflight(local_storage, project, remote=True, job_env={})
    preflight(local_storage, project, True, {"ADATT_SHARED_STORAGE": "/home/me"})


def test_remote_data_must_be_shared(project):
    with pytest.raises(ConfigError, match=r"^data\.path: \['/data/logs'\] is local"):
        # storage and tracking fine, data on this machine only
        preflight(train("-c configs/c.yaml --set data.path=/data/logs"), project, True, {})
    preflight(train("-c configs/c.yaml --set data.path=/nfs/logs"), project, False, {})
    preflight(
        train("-c configs/c.yaml --set data.path=/nfs/logs"),
        project,
        True,
        {"ADATT_SHARED_STORAGE": "/nfs"},
    )


def test_remote_config_must_be_shipped(project, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "c.yaml"
    outside.write_text(CONFIG)
    with pytest.raises(ConfigError, match="outside the working directory"):
        preflight(train(f"-c {outside}"), project, remote=True, job_env={})
    preflight(train(f"-c {outside}"), project, remote=False, job_env={})
