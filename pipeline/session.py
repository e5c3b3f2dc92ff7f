"""The driver prologue every command runs: one MLflow client, Ray by its address, quiet
logs, signals. Train, tune, predict, evaluate and retrain open a `Session` the same way.

- **Tracking**: the tracking URI is resolved once (config, else `MLFLOW_TRACKING_URI`,
  else local SQLite), checked reachable, and held by one `MlflowClient` that is handed to
  everything that logs or reads models. The process-global MLflow tracking URI is never
  set.
- **Ray by address**: with `RAY_ADDRESS` set (an address, or `auto` for the cluster this
  machine last started), that cluster is joined after a quick check that it answers;
  without it a fresh local instance starts on a chosen port, whatever else runs on the
  machine. Either way the address is put in `RAY_ADDRESS` for every process the run
  launches (Ray's own helpers, such as Train's placement-group cleaner, otherwise guess it
  from the machine's processes and fail when several clusters run).
- **Quiet logs**: Ray Data's per-dataset lines (`Execution plan of Dataset ...`,
  `execution finished`) go to Ray's log files only, in every process of the job, so the
  console shows the product's own lines.
- **Signals**: SIGTERM becomes an interrupt (`interruptible`), so a stopped run ends
  KILLED (resumable), not FAILED.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.util
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.errors import InputError
from pipeline.ports import free_port
from pipeline.tracking.runs import (
    check_tracking_reachable,
    client_for,
    quiet_telemetry,
    resolve_tracking_uri,
)
from pipeline.tracking.security import redact_text
from pipeline.worker_setup import quiet_ray_data_console

ADDRESS_ENV = "RAY_ADDRESS"
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"  # read by Ray when it starts a local head
CONNECT_TIMEOUT_S = 5.0
# A local instance keeps idle worker processes for a minute, and up to 8 of them: each
# worker's Ray Data stream runs its read tasks in bursts (an epoch, a validation pass), and
# with Ray's defaults (as many as CPUs, killed after 1 s idle) every burst started fresh
# Python processes (about 2 s each on 2 CPUs). `RAY_<name>` variables still win.
WARM_WORKERS = {"num_workers_soft_limit": 8, "idle_worker_killing_time_threshold_ms": 60_000}
# Light on purpose: every worker process of the job imports it (see the module).
WORKER_SETUP_HOOK = "pipeline.worker_setup.quiet_ray_data_console"


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interrupt so that the run ends as KILLED, not FAILED."""


@dataclass(frozen=True)
class Session:
    """What a command's driver works with: the tracking store and its client.

    Attributes:
        command: the command's name, for the echo line.
        tracking_uri: the resolved MLflow tracking URI.
    """

    command: str
    tracking_uri: str

    @functools.cached_property
    def client(self) -> MlflowClient:
        """The one MLflow client of the store (runs and registry), made on first use: a
        client of a SQLite store creates the database, and a command refused for bad input
        must leave none behind."""
        return client_for(self.tracking_uri)

    def start_ray(self, num_cpus: float | None = None) -> str:
        """Start or join Ray (see the module docstring); its GCS address."""
        return start_ray(num_cpus)

    def echo(self, line: str) -> None:
        """One line about what the command does, on stderr (credentials redacted)."""
        print(redact_text(f"adatt {self.command}: {line}"), file=sys.stderr, flush=True)


def open_session(command: str, tracking: TrackingConfig | str | None = None) -> Session:
    """The prologue: quiet telemetry and Ray Data's console, the tracking store resolved
    and checked reachable (a ConfigError naming `tracking.tracking_uri` otherwise)."""
    quiet_telemetry()
    quiet_ray_data_console()
    if not isinstance(tracking, TrackingConfig):
        tracking = TrackingConfig(tracking_uri=tracking)
    uri = resolve_tracking_uri(tracking)
    check_tracking_reachable(uri)
    return Session(command, uri)


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            return True
    except (OSError, ValueError):
        return False


def address_file() -> Path:
    """Where `ray start` records the address of the cluster it started (Ray's own rule:
    `$RAY_TMPDIR`, else `$TMPDIR`, else /tmp, then `ray/ray_current_cluster`)."""
    temp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(temp) / "ray" / "ray_current_cluster"


def resolve_address(given: str) -> str:
    """The GCS address `RAY_ADDRESS` names (`auto`: the one in Ray's address file), checked
    to answer; InputError naming it otherwise, within seconds (Ray itself would retry a
    dead head for minutes)."""
    address, source = given, f"{ADDRESS_ENV}={given}"
    if given == "auto":
        file = address_file()
        address = file.read_text().strip() if file.is_file() else ""
        if not address:
            raise InputError(
                f"{source}: no Ray cluster was started on this machine ({file} is missing); "
                f"start one with `ray start --head`, or unset {ADDRESS_ENV} to start a fresh "
                "local Ray instance"
            )
        source += f" ({address}, from {file})"
    if address.startswith(("ray://", "http://", "https://")):
        return address  # Ray Client or a job server: Ray checks those itself
    if not _answers(address):
        raise InputError(
            f"{source}: the Ray cluster at {address} does not answer (its head is down, or "
            f"the address is wrong); start it, or unset {ADDRESS_ENV} to start a fresh "
            "local Ray instance"
        )
    _check_admits(address, source)
    return address


@contextlib.contextmanager
def _stderr_dropped() -> Iterator[None]:
    """Drop what the process writes to file descriptor 2 while inside: Ray's C++ client
    logs each failed attempt there, above the one line that explains it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _check_admits(address: str, source: str) -> None:
    """InputError naming `source` unless the cluster's GCS at `address` admits this process:
    one call of Ray's own GCS client, where `ray.init` would retry for about 20 s and then
    raise a traceback (a token the cluster wants and this process lacks, most often)."""
    from ray._raylet import GcsClient

    try:
        with _stderr_dropped():
            GcsClient(address=address)
    except Exception as err:  # Ray's errors carry no stable type beyond their text
        text = " ".join(str(err).split())
        if "InvalidAuthToken" in text or "Unauthenticated" in text:
            raise InputError(
                f"{source}: the Ray cluster at {address} wants an auth token that this "
                "process lacks or has wrong; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
                "RAY_AUTH_TOKEN_PATH) to its token (`ray get-auth-token` on its head)"
            ) from None
        raise InputError(
            f"{source}: could not join the Ray cluster at {address}: {text[:300]}"
        ) from None


def start_ray(num_cpus: float | None = None) -> str:
    """Join the cluster `RAY_ADDRESS` names, or start a fresh local instance on a chosen
    port; either way every process of the job gets the address in `RAY_ADDRESS` and the
    quiet Ray Data console. Returns the GCS address. Does nothing when Ray is already up
    in this process (a caller's own `ray.init`)."""
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    given = os.environ.get(ADDRESS_ENV, "").strip()
    if given and given != "local":  # `local`, as for Ray: a fresh local instance
        address = resolve_address(given)
        try:
            ray.init(address=address, runtime_env=_job_env(address), log_to_driver=True)
        except (ConnectionError, RuntimeError) as err:
            last = " ".join(str(err).split())[:300]
            raise InputError(
                f"{ADDRESS_ENV}={given}: could not join the Ray cluster at {address}: {last}"
            ) from None
        return address
    # The address Ray will give this node's head (its IP, as Ray resolves it) on a port
    # chosen here, so that it is known before any process starts.
    address = f"{ray.util.get_node_ip_address()}:{free_port()}"
    os.environ[GCS_PORT_ENV] = address.rpartition(":")[2]
    os.environ[ADDRESS_ENV] = address  # this process's children find this instance
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            dashboard_host="127.0.0.1",  # a local cluster's dashboard listens on loopback
            runtime_env=_job_env(address),
            log_to_driver=True,
            _system_config=WARM_WORKERS,
        )
    finally:
        os.environ.pop(GCS_PORT_ENV, None)
    return address


def _job_env(address: str) -> dict[str, Any]:
    # Unbuffered: a job's workers and actors write each line to the log that Ray forwards.
    env = {ADDRESS_ENV: address, "PYTHONUNBUFFERED": "1"}
    return {"env_vars": env, "worker_process_setup_hook": WORKER_SETUP_HOOK}


def storage_uri(path: str) -> str:
    """Ray Train needs an absolute path or a URI for checkpoints."""
    return path if "://" in path else str(Path(path).resolve())


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """While inside, SIGTERM (e.g. `kill`, a scheduler's stop) raises `Terminated`.

    Ray's `ray.init` installs a SIGTERM handler that calls `sys.exit`, which would mark the
    run FAILED; a stop is not a failure. Only the main thread can handle signals: elsewhere
    (e.g. a Tune trial thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except KeyboardInterrupt as err:
        # Raised inside `ray.get`, the handler's exception comes back as a plain
        # KeyboardInterrupt; the flag still tells a SIGTERM from a Ctrl-C.
        if received and not isinstance(err, Terminated):
            raise Terminated(f"signal {received[0]}") from err
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
