"""Rules a training run must follow on a Ray cluster, checked before any work starts.

Two things break silently on a cluster, so they are errors here:

- Checkpoints: Ray Train writes them to `RunConfig(storage_path=...)` from every worker. A
  local path on a multi-node cluster means each node writes to its own disk and the run's
  checkpoints are scattered (or lost with the node). Storage must be reachable from every
  node: an object store URI (s3://, gs://, abfs://, ...) or a shared file system mount.
- Tracking: a local MLflow store (`sqlite:///mlflow.db`, `./mlruns`, `file://...`) on a
  remote cluster writes the run to the head node's disk, where nobody looks and which goes
  away with the cluster. A remote job must log to a tracking server (http/https/databricks).

A local path counts as shared when it lies under a mount point the user declares:

- `/mnt/cluster_storage` is shared by default (the NFS mount Ray's cluster docs use);
- `ADATT_SHARED_STORAGE=/mnt/efs:/shared` (os.pathsep-separated) adds mount points;
- `ADATT_SHARED_STORAGE=1` (or `true`/`yes`) declares every local path shared, for clusters
  where all nodes mount the same file system at the same place.

`/mnt` as a whole is deliberately not shared by default: cloud images often mount the
instance's local scratch disk there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import PurePosixPath
from urllib.parse import urlparse

from pipeline.errors import ConfigError

SHARED_STORAGE_ENV = "ADATT_SHARED_STORAGE"
# Set by `adatt submit` in the job's environment when the cluster is not on this machine.
REMOTE_SUBMISSION_ENV = "ADATT_REMOTE_SUBMISSION"
DEFAULT_SHARED_PREFIXES = ("/mnt/cluster_storage",)
# pyarrow filesystems that every node reaches over the network.
REMOTE_STORAGE_SCHEMES = frozenset({"s3", "gs", "gcs", "abfs", "abfss", "az", "hdfs", "viewfs"})
TRACKING_SERVER_SCHEMES = frozenset({"http", "https", "databricks"})
_TRUE = frozenset({"1", "true", "yes", "on"})


def shared_prefixes(env: Mapping[str, str] | None = None) -> tuple[str, ...] | None:
    """Mount points declared shared; None means "every local path is shared".

    Args:
        env: environment to read `ADATT_SHARED_STORAGE` from (default: os.environ).

    Example:
        >>> shared_prefixes({"ADATT_SHARED_STORAGE": "/mnt/efs:/shared"})
        ('/mnt/cluster_storage', '/mnt/efs', '/shared')
    """
    value = (os.environ if env is None else env).get(SHARED_STORAGE_ENV, "").strip()
    if value.lower() in _TRUE:
        return None
    extra = tuple(
        p for p in value.split(os.pathsep) if p.strip() and p.lower() not in {"0", "false"}
    )
    return DEFAULT_SHARED_PREFIXES + tuple(p.strip() for p in extra)


def _scheme(uri: str) -> str:
    scheme = urlparse(uri).scheme.lower()
    # A one-letter "scheme" is a Windows drive (C:\...), i.e. a local path.
    return "" if len(scheme) <= 1 else scheme


def is_shared_storage(storage_path: str, env: Mapping[str, str] | None = None) -> bool:
    """True when every node of a cluster can read and write `storage_path`.

    Example:
        >>> is_shared_storage("s3://bucket/runs", {}), is_shared_storage("runs", {})
        (True, False)
    """
    scheme = _scheme(storage_path)
    if scheme in REMOTE_STORAGE_SCHEMES:
        return True
    if scheme not in ("", "file"):
        return False
    path = urlparse(storage_path).path if scheme == "file" else storage_path
    prefixes = shared_prefixes(env)
    if prefixes is None:
        return True
    if not os.path.isabs(path):
        return False
    pure = PurePosixPath(os.path.normpath(path))
    return any(pure.is_relative_to(PurePosixPath(p.rstrip("/") or "/")) for p in prefixes)


def is_tracking_server(tracking_uri: str | None) -> bool:
    """True for an MLflow tracking server URI (http, https, databricks), not a local store."""
    if tracking_uri is None:
        return False
    # MLflow's usual Databricks URI is the bare word "databricks" (or databricks://profile).
    return tracking_uri.strip() == "databricks" or _scheme(tracking_uri) in TRACKING_SERVER_SCHEMES


def is_remote_submission(env: Mapping[str, str] | None = None) -> bool:
    """True inside a job that `adatt submit` sent to a cluster on another machine."""
    return (os.environ if env is None else env).get(REMOTE_SUBMISSION_ENV, "").lower() in _TRUE


def check_cluster_rules(
    storage_path: str,
    tracking_uri: str | None,
    num_nodes: int,
    remote_submission: bool,
    env: Mapping[str, str] | None = None,
) -> None:
    """Raise ConfigError when the run's storage or tracking cannot work on this cluster.

    Args:
        storage_path: `train.storage_path`, where Ray Train writes checkpoints.
        tracking_uri: the MLflow URI the run will use (`tracking.tracking_uri`, else
            MLFLOW_TRACKING_URI); None means the local SQLite default.
        num_nodes: nodes the run may use; a remote autoscaling cluster counts as several.
        remote_submission: the job runs on a cluster on another machine.
        env: environment for `ADATT_SHARED_STORAGE` (default: os.environ).

    Example:
        >>> check_cluster_rules("s3://b/runs", "http://mlflow:5000", 4, True, {})  # fine
        >>> check_cluster_rules("runs", None, 1, False, {})  # a laptop: fine too
    """
    problems = []
    if num_nodes > 1 and not is_shared_storage(storage_path, env):
        problems.append(
            f"train.storage_path: {storage_path!r} is local to each machine, but the run "
            f"spans {num_nodes} nodes, so every node would keep its own checkpoints. Use "
            "storage every node reaches (s3://..., gs://..., abfs://..., or a shared mount "
            f"under {', '.join(DEFAULT_SHARED_PREFIXES)}), or declare the mount shared with "
            f"{SHARED_STORAGE_ENV}=<mount point> (or {SHARED_STORAGE_ENV}=1)."
        )
    if remote_submission and not is_tracking_server(tracking_uri):
        shown = repr(tracking_uri) if tracking_uri else "not set (local sqlite:///mlflow.db)"
        problems.append(
            f"tracking.tracking_uri: {shown} is a local MLflow store, but the job runs on a "
            "remote cluster, so the run would land on the head node's disk. Use a tracking "
            "server: --set tracking.tracking_uri=http://<mlflow-host>:5000 (https:// and "
            "databricks also work) or export MLFLOW_TRACKING_URI."
        )
    if problems:
        raise ConfigError("\n".join(problems))
