"""A real Ray head with token auth (`ray start --head`) on 127.0.0.1, for the submission
tests; the MLflow server is the session's (`tests/conftest.py`).

It is started as a child process of the test session in its own temp directory, named by
its address (`RAY_ADDRESS` in its environment: the session's two-node cluster runs beside
it), and torn down by process id, never with `ray stop`: `ray stop` kills every Ray process
on the machine, including other users' clusters.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from bench.harness import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def _base_env() -> dict[str, str]:
    # None of this process's Ray settings (the session's own Ray instances set several):
    # the cluster started here is independent of them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.pop("MLFLOW_TRACKING_URI", None)
    # Job drivers run `python ...` through a shell: it must be this interpreter.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(RAY_USAGE_STATS_ENABLED="0", MLFLOW_ENABLE_TELEMETRY="false", DO_NOT_TRACK="1")
    return env


def stop_process_tree(
    proc: subprocess.Popen, marker: str | None = None, grace_s: float = 3
) -> None:
    """Stop `proc`, all its descendants and any process whose command line holds `marker`.

    Ray detaches its workers and job drivers into their own sessions, so a process group
    kill misses them; the tree is collected while the parent is still alive.
    """
    procs: list[psutil.Process] = []
    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    if marker:
        for p in psutil.process_iter(["cmdline"]):
            if p not in procs and any(marker in arg for arg in (p.info["cmdline"] or [])):
                procs.append(p)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    proc.wait(timeout=grace_s)


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float, **kw) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited early:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2, **kw).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not up after {timeout_s}s:\n{log.read_text()[-3000:]}")


@dataclass(frozen=True)
class RayHead:
    address: str  # job server (dashboard) URL
    gcs_address: str
    token_path: Path
    temp_dir: Path

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment for an `adatt` subprocess that talks to this cluster."""
        env = _base_env()
        env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        env.update(extra)
        return env


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """`ray start --head --num-cpus=2` on free loopback ports, with token auth on."""
    # A short path: Ray's unix sockets live under it and socket paths are capped at ~107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="adatt-ray-", dir="/tmp"))
    token_path = temp_dir / "auth_token"
    token_path.write_text(secrets.token_hex(16))
    port, dashboard_port = free_port(), free_port()
    env = _base_env()
    # Our own token file and explicit mode: never depend on (or touch) ~/.ray/auth_token.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    # Its processes name this cluster: the session's two-node cluster runs beside it.
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    log = temp_dir / "ray-start.log"
    cmd = [
        _tool("ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus=2",
        "--num-gpus=0",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--port={port}",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
        "--disable-usage-stats",
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        headers = {"Authorization": f"Bearer {token_path.read_text()}"}
        _wait_http(f"{address}/api/version", proc, log, timeout_s=90, headers=headers)
        yield RayHead(address, f"127.0.0.1:{port}", token_path, temp_dir)
    finally:
        stop_process_tree(proc, marker=str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
