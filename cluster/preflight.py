"""Checks `adatt submit` runs on this machine before a training job goes to a cluster.

A bad config should fail here in a second, not on the cluster after the upload and the
image pull. For `adatt train` entrypoints the config named by `--config` (with its
`--set` overrides) is validated, and for a remote cluster the cluster rules of
`pipeline.cluster_rules` apply, plus one more: the data must be reachable from every node.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path

from pipeline.cluster_rules import check_cluster_rules, is_shared_storage
from pipeline.config import load_config
from pipeline.errors import ConfigError

# An autoscaling cluster adds worker nodes after submission, and the client cannot see the
# cluster's disks, so a remote cluster is checked as a multi-node one.
REMOTE_NODES_ASSUMED = 2


def train_args(command: str) -> tuple[str | None, list[str]] | None:
    """(config path, overrides) of a `python -m pipeline.cli train` command, else None.

    Example:
        >>> train_args("python -m pipeline.cli train -c a.yaml --set train.epochs=1")
        ('a.yaml', ['train.epochs=1'])
    """
    try:
        tokens = shlex.split(command)
    except ValueError:
        return None
    for i in range(1, len(tokens) - 1):
        if tokens[i - 1] == "-m" and tokens[i] == "pipeline.cli" and tokens[i + 1] == "train":
            break
    else:
        return None
    config, overrides = None, []
    args = iter(tokens[i + 2 :])
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in ("--config", "-c", "--set", "-s"):
            value = value if eq else next(args, "")
            if name in ("--config", "-c"):
                config = value
            else:
                overrides.append(value)
    return config, overrides


def preflight(command: str, working_dir: Path, remote: bool, job_env: Mapping[str, str]) -> None:
    """Raise ConfigError when a train job's config is invalid or cannot work on the cluster.

    Args:
        command: the job's shell command (after `rewrite_entrypoint`).
        working_dir: the directory shipped as the job's working_dir.
        remote: the cluster is on another machine.
        job_env: the job's environment variables (MLFLOW_TRACKING_URI etc.).
    """
    parsed = train_args(command)
    if parsed is None or parsed[0] is None:
        return  # not a train command, or no --config: `adatt train` reports that itself
    config, overrides = parsed
    path = Path(config) if Path(config).is_absolute() else working_dir / config
    if remote and not path.resolve().is_relative_to(working_dir):
        raise ConfigError(
            f"{config}: the config is outside the working directory {working_dir}, so it "
            "would not reach the cluster; move it under the project (e.g. configs/)"
        )
    cfg = load_config(path, overrides)
    data_paths = [cfg.data.path] if isinstance(cfg.data.path, str) else list(cfg.data.path)
    _check_not_relative(data_paths, cfg.train.storage_path)
    if not remote:
        return
    tracking_uri = cfg.tracking.tracking_uri or job_env.get("MLFLOW_TRACKING_URI")
    check_cluster_rules(
        cfg.train.storage_path,
        tracking_uri,
        num_nodes=REMOTE_NODES_ASSUMED,
        remote_submission=True,
        env=job_env,
    )
    local = [p for p in data_paths if not is_shared_storage(p, job_env)]
    if local:
        raise ConfigError(
            f"data.path: {local} is local to this machine, but the job runs on a remote "
            "cluster whose nodes read the data themselves (data is never shipped with the "
            "code). Put the logs in s3://, gs://, abfs:// or a shared mount."
        )


def _is_relative_local(path: str) -> bool:
    return "://" not in path and not Path(path).is_absolute()


def _check_not_relative(data_paths: list[str], storage_path: str) -> None:
    # A job runs in a temporary copy of the working directory without data/ and runs/, so a
    # relative path finds no data there, and checkpoints written there are deleted with it.
    problems = []
    relative = [p for p in data_paths if _is_relative_local(p)]
    if relative:
        problems.append(f"data.path: {relative} is relative")
    if _is_relative_local(storage_path):
        problems.append(f"train.storage_path: {storage_path!r} is relative")
    if problems:
        raise ConfigError(
            "\n".join(
                f"{p}, but a submitted job runs in a temporary copy of the working directory "
                "without data/ or runs/; give an absolute path or a URI (s3://, gs://, ...), "
                "e.g. --set train.storage_path=/abs/path"
                for p in problems
            )
        )
