"""Cluster-mode rules: shared checkpoint storage and a tracking server for remote jobs."""

from __future__ import annotations

import pytest

from pipeline.cluster_rules import (
    check_cluster_rules,
    is_remote_submission,
    is_shared_storage,
    is_tracking_server,
    shared_prefixes,
)
from pipeline.errors import ConfigError

NO_ENV: dict[str, str] = {}


@pytest.mark.parametrize(
    "path",
    [
        "s3://bucket/runs",
        "gs://bucket/runs",
        "abfs://container@account.dfs.core.windows.net/runs",
        "hdfs://namenode/runs",
        "/mnt/cluster_storage/adatt",
        "file:///mnt/cluster_storage/adatt",
    ],
)
def test_shared_storage(path):
    assert is_shared_storage(path, NO_ENV)


@pytest.mark.parametrize(
    "path",
    [
        "runs",
        "./runs",
        "/home/me/runs",
        "/tmp/runs",
        "/mnt/scratch/runs",  # /mnt is often the instance's local disk
        "/mnt/cluster_storage_evil/runs",  # a prefix of the name, not of the path
        "/mnt/cluster_storage/../etc",
        "file:///home/me/runs",
        "C:\\runs",
        "http://example.com/runs",
    ],
)
def test_local_storage(path):
    assert not is_shared_storage(path, NO_ENV)


def test_env_declares_extra_mount_points():
    env = {"ADATT_SHARED_STORAGE": "/efs:/shared/nfs/"}
    assert shared_prefixes(env) == ("/mnt/cluster_storage", "/efs", "/shared/nfs/")
    assert is_shared_storage("/efs/runs", env)
    assert is_shared_storage("/shared/nfs/runs", env)
    assert not is_shared_storage("/home/me/runs", env)
    assert not is_shared_storage("runs", env)


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_env_declares_every_path_shared(value):
    env = {"ADATT_SHARED_STORAGE": value}
    assert shared_prefixes(env) is None
    assert is_shared_storage("/home/me/runs", env)
    assert is_shared_storage("runs", env)


@pytest.mark.parametrize("value", ["", "0", "false"])
def test_env_off_values_keep_defaults(value):
    assert shared_prefixes({"ADATT_SHARED_STORAGE": value}) == ("/mnt/cluster_storage",)


@pytest.mark.parametrize(
    ("uri", "server"),
    [
        ("http://mlflow:5000", True),
        ("https://mlflow.example.com", True),
        ("databricks", True),  # MLflow's usual spelling
        ("databricks://profile", True),
        ("sqlite:///mlflow.db", False),
        ("file:///tmp/mlruns", False),
        ("./mlruns", False),
        ("/abs/mlruns", False),
        (None, False),
    ],
)
def test_tracking_server(uri, server):
    assert is_tracking_server(uri) is server


def test_single_node_local_everything_is_fine():
    check_cluster_rules("runs", None, num_nodes=1, remote_submission=False, env=NO_ENV)
    check_cluster_rules("/tmp/runs", "sqlite:///mlflow.db", 1, False, env=NO_ENV)


def test_multi_node_cluster_needs_shared_storage():
    with pytest.raises(ConfigError) as err:
        check_cluster_rules("/tmp/runs", "http://mlflow:5000", 3, False, env=NO_ENV)
    message = str(err.value)
    assert message.startswith("train.storage_path: '/tmp/runs'")
    assert "3 nodes" in message
    assert "ADATT_SHARED_STORAGE" in message
    assert "tracking.tracking_uri" not in message
    check_cluster_rules("s3://b/runs", "sqlite:///x.db", 3, False, env=NO_ENV)


def test_remote_job_needs_a_tracking_server():
    for uri in (None, "sqlite:///mlflow.db", "./mlruns"):
        with pytest.raises(ConfigError, match=r"^tracking\.tracking_uri: ") as err:
            check_cluster_rules("s3://b/runs", uri, 2, True, env=NO_ENV)
        assert "http://" in str(err.value)
    check_cluster_rules("s3://b/runs", "https://mlflow.example.com", 2, True, env=NO_ENV)
    # A remote single-node cluster may keep checkpoints on its disk; tracking still matters.
    check_cluster_rules("/tmp/runs", "http://mlflow:5000", 1, True, env=NO_ENV)


def test_both_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        check_cluster_rules("runs", "sqlite:///mlflow.db", 2, True, env=NO_ENV)
    lines = str(err.value).splitlines()
    assert [line.split(":")[0] for line in lines] == ["train.storage_path", "tracking.tracking_uri"]


def test_remote_submission_flag():
    assert is_remote_submission({"ADATT_REMOTE_SUBMISSION": "1"})
    assert not is_remote_submission({})
    assert not is_remote_submission({"ADATT_REMOTE_SUBMISSION": "0"})
