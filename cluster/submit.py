"""Submit, list and stop training jobs on a Ray cluster through the Ray Job Submission SDK.

`submit_job` ships the working directory (code and configs, never data or local MLflow
files) as the job's runtime_env, passes the environment the job needs, streams the logs
when asked to wait, and returns the final status. Auth tokens are handled in
`cluster.auth`; the checks a config must pass before it goes to a remote cluster are in
`cluster.preflight`.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

from cluster.auth import AuthToken, ClusterAuthError, explain_auth_failure, find_auth_token
from cluster.preflight import preflight
from pipeline.cluster_rules import REMOTE_SUBMISSION_ENV, SHARED_STORAGE_ENV
from pipeline.errors import InputError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# What the job must not carry: data and run outputs (large, and on a cluster they live in
# shared storage), local MLflow stores, environments and caches. Leading "/" anchors a
# pattern to the working directory, so e.g. a `pipeline/data/` package would still ship.
WORKING_DIR_EXCLUDES = [
    "/data/",
    "/runs/",
    "/mlruns/",
    "/mlartifacts/",
    "mlflow.db",
    "*.parquet",
    "/.venv/",
    "/venv/",
    "/.git/",
    "__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".hypothesis/",
    "*.egg-info/",
    "/build/",
    "/dist/",
]
# Passed from the submitting shell to the job when set. Credentials are not on this list on
# purpose: runtime_env variables are visible in the dashboard; keep secrets in the cluster.
PASSTHROUGH_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", SHARED_STORAGE_ENV)
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


class ClusterUnreachable(InputError):
    """No Ray job server answers at the address."""


def default_address(env: Mapping[str, str] | None = None) -> str:
    """The job server address: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, then local."""
    env = os.environ if env is None else env
    return env.get("RAY_API_SERVER_ADDRESS") or env.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def is_local_address(address: str | None) -> bool:
    """True when the job server runs on this machine (loopback, or "auto"/unset)."""
    if not address or address == "auto":
        return True
    host = urlparse(address if "://" in address else f"http://{address}").hostname
    return host in _LOCAL_HOSTS


def rewrite_entrypoint(entrypoint: list[str]) -> str:
    """The shell command the job runs, with a leading `adatt` made cluster-proof.

    The `adatt` console script exists only where the project was pip-installed; on a
    cluster the code usually arrives as the job's working_dir, which is importable but
    installs no scripts. `python -m pipeline.cli` runs the same CLI in both cases.
    One argument is taken as a ready shell string (as `ray job submit` does); several are
    quoted and joined.

    Example:
        >>> rewrite_entrypoint(["adatt", "train", "--config", "my cfg.yaml"])
        "python -m pipeline.cli train --config 'my cfg.yaml'"
    """
    if not entrypoint:
        raise InputError("submit: give the command to run after `--`, e.g. -- adatt train ...")
    if len(entrypoint) == 1:
        command = entrypoint[0].strip()
        head, _, rest = command.partition(" ")
        return f"python -m pipeline.cli {rest}".strip() if head == "adatt" else command
    if entrypoint[0] == "adatt":
        entrypoint = ["python", "-m", "pipeline.cli", *entrypoint[1:]]
    return shlex.join(entrypoint)


def project_requirements(pyproject: Path) -> list[str]:
    """The project's dependencies from pyproject.toml, for a runtime_env `pip` list.

    Ray itself is left out: the cluster already runs Ray, and a second install in the job's
    environment would shadow it with a possibly different version.
    """
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    from packaging.requirements import Requirement

    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [d for d in deps if Requirement(d).name.lower() != "ray"]


def build_runtime_env(
    working_dir: Path,
    env_vars: Mapping[str, str],
    pip: bool = False,
) -> dict[str, Any]:
    """The job's runtime_env: working_dir with excludes, env vars, optional pip list."""
    runtime_env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "excludes": list(WORKING_DIR_EXCLUDES),
        "env_vars": dict(env_vars),
    }
    if pip:
        pyproject = working_dir / "pyproject.toml"
        if not pyproject.is_file():
            raise InputError(f"--pip: {pyproject} not found; run from the project root")
        runtime_env["pip"] = project_requirements(pyproject)
    return runtime_env


def job_env_vars(
    remote: bool, extra: list[str] | None = None, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment variables for the job: pass-through names, the remote marker, extras.

    `extra` items are `KEY=VALUE` or `KEY` (copied from this shell).
    """
    env = os.environ if env is None else env
    out = {k: env[k] for k in PASSTHROUGH_ENV if env.get(k)}
    if remote:
        out[REMOTE_SUBMISSION_ENV] = "1"
    for item in extra or []:
        key, sep, value = item.partition("=")
        if not sep:
            if key not in env:
                raise InputError(f"--env {key}: not set in this shell; use --env {key}=VALUE")
            value = env[key]
        out[key] = value
    return out


@contextmanager
def _explained(address: str, token: AuthToken | None) -> Iterator[None]:
    """Turn the SDK's auth and connection failures into messages that say what to do."""
    try:
        yield
    except AuthenticationError as err:
        status = 403 if str(err.message).startswith("Authentication failed") else 401
        raise ClusterAuthError(explain_auth_failure(address, status, token)) from None
    except (ConnectionError, requests.exceptions.ConnectionError):
        raise ClusterUnreachable(
            f"no Ray job server answers at {address}: is the cluster up, and is its dashboard "
            "port (default 8265) reachable from here (e.g. `ray dashboard cluster.yaml` or "
            "`kubectl port-forward svc/<cluster>-head-svc 8265`)?"
        ) from None


@contextmanager
def connect(address: str | None = None) -> Iterator[JobSubmissionClient]:
    """A job client for `address`, sending the auth token when one applies.

    Errors inside the `with` block are explained like connection errors are.
    """
    address = address or default_address()
    token = find_auth_token(local_cluster=is_local_address(address))
    with _explained(address, token):
        yield JobSubmissionClient(address, headers=token.headers() if token else None)


def submit_job(
    address: str | None,
    entrypoint: list[str],
    working_dir: str | Path = ".",
    wait: bool = False,
    *,
    pip: bool = False,
    extra_env: list[str] | None = None,
    check: bool = True,
    log: Callable[[str], None] = lambda text: print(text, end="", flush=True),
) -> tuple[str, JobStatus]:
    """Submit `entrypoint` as a Ray job; with `wait`, stream its logs until it ends.

    Args:
        address: job server URL (http://head:8265); None uses `default_address()`.
        entrypoint: the command, e.g. ["adatt", "train", "--config", "c.yaml"].
        working_dir: directory shipped to the cluster (code and configs).
        wait: stream logs and return the final status instead of the first one.
        pip: install the project's pyproject dependencies in the job (for cluster images
            that lack them).
        extra_env: more job env vars, `KEY=VALUE` or `KEY`.
        check: for `adatt train`, validate the config and the cluster rules first.
        log: where streamed log text goes.

    Returns:
        (job id, status): the final status with `wait`, else the status right after submit.

    Example:
        >>> submit_job("http://127.0.0.1:8265", ["python", "-c", "print(1)"], wait=True)  # doctest: +SKIP
        ('raysubmit_...', <JobStatus.SUCCEEDED: 'SUCCEEDED'>)
    """
    address = address or default_address()
    working_dir = Path(working_dir).resolve()
    if not working_dir.is_dir():
        raise InputError(f"--working-dir {working_dir}: not a directory")
    remote = not is_local_address(address)
    command = rewrite_entrypoint(entrypoint)
    env_vars = job_env_vars(remote, extra_env)
    if check:
        preflight(command, working_dir, remote=remote, job_env=env_vars)
    runtime_env = build_runtime_env(working_dir, env_vars, pip=pip)
    with connect(address) as client:
        job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env)
        if not wait:
            return job_id, client.get_job_status(job_id)
        try:
            asyncio.run(_follow_logs(client, job_id, log))
        except KeyboardInterrupt:
            log(f"\ninterrupted: job {job_id} keeps running; stop it with `adatt stop {job_id}`\n")
            raise
        return job_id, _wait_until_done(client, job_id)


async def _follow_logs(client: JobSubmissionClient, job_id: str, log: Callable[[str], None]):
    async for text in client.tail_job_logs(job_id):
        log(text)


def _wait_until_done(client: JobSubmissionClient, job_id: str, poll_s: float = 0.5) -> JobStatus:
    # The log stream can close a moment before the job's status turns terminal.
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(poll_s)
    return status


def failure_report(address: str | None, job_id: str, lines: int = 40) -> str:
    """The job's status message and the last `lines` lines of its log."""
    with connect(address) as client:
        info = client.get_job_info(job_id)
        tail = client.get_job_logs(job_id).rstrip("\n").splitlines()[-lines:]
    header = f"job {job_id} {info.status.value}"
    if info.message:
        # Ray appends its own copy of the logs to the message; its first line is the reason.
        header += f": {info.message.strip().splitlines()[0]}"
    return "\n".join([header, f"--- last {len(tail)} log lines ---", *tail])


def list_jobs(address: str | None = None) -> list[JobDetails]:
    """Jobs submitted to the cluster, oldest first (drivers started by hand are left out)."""
    with connect(address) as client:
        jobs = [j for j in client.list_jobs() if j.submission_id]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def stop_job(address: str | None, job_id: str) -> bool:
    """Ask the cluster to stop a job; False when it had already finished."""
    with connect(address) as client:
        try:
            return client.stop_job(job_id)
        except RuntimeError as err:
            if "404" in str(err) or "does not exist" in str(err):
                raise InputError(f"stop: no job {job_id!r} on this cluster") from None
            raise


def exit_code(status: JobStatus) -> int:
    """0 for SUCCEEDED, 1 for anything else."""
    return 0 if status == JobStatus.SUCCEEDED else 1
