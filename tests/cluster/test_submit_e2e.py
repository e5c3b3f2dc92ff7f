"""`adatt submit / jobs / stop` against a real Ray head with token auth and a real MLflow server.

No mocks: the jobs run on the cluster started by `tests/cluster/conftest.py`. A second
worker node is left out on purpose: the CI machine has 2 cores and one head already uses
them; the multi-node rules are covered by unit tests of `pipeline.cluster_rules`.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.submit import submit_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO_ROOT = Path(__file__).resolve().parents[2]


def adatt(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, from the project root."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_submit_wait_streams_logs_and_exits_zero(ray_head):
    result = adatt(
        "submit",
        "--address",
        ray_head.address,
        "--wait",
        "--",
        "python",
        "-c",
        "print('hello from', 'the cluster')",
        env=ray_head.client_env(),
    )
    assert result.returncode == 0, result.stderr
    assert "hello from the cluster" in result.stdout
    assert "SUCCEEDED" in result.stderr


def test_failing_job_exits_one_and_prints_log_tail(ray_head):
    result = adatt(
        "submit",
        "--address",
        ray_head.address,
        "--wait",
        "--",
        "python",
        "-c",
        "import sys; print('step 1 done'); sys.exit(3)",
        env=ray_head.client_env(),
    )
    assert result.returncode == 1
    assert "FAILED" in result.stderr
    tail = result.stderr.split("last", 1)[1]
    assert "step 1 done" in tail
    assert "exit code 3" in result.stderr.lower() or "exited with code 3" in result.stderr


def test_adatt_entrypoint_runs_from_the_shipped_working_dir(ray_head, monkeypatch):
    # `adatt` is not installed on the cluster: the rewrite to `python -m pipeline.cli` and
    # the uploaded working_dir must be enough.
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(ray_head.token_path))
    lines: list[str] = []
    job_id, status = submit_job(
        ray_head.address, ["adatt", "--help"], REPO_ROOT, wait=True, log=lines.append
    )
    logs = "".join(lines)
    assert status.value == "SUCCEEDED", logs[-3000:]
    assert job_id.startswith("raysubmit_")
    assert "python -m pipeline.cli --help" in logs  # Ray echoes the entrypoint it ran
    assert "submit" in logs and "train" in logs.lower()


def test_job_env_reaches_mlflow_server(ray_head, mlflow_server):
    # MLFLOW_TRACKING_URI is passed from the submitting shell to the job.
    script = (
        "import mlflow; mlflow.set_experiment('submit-smoke'); "
        "run = mlflow.start_run(run_name='from-job'); mlflow.log_metric('answer', 42.0); "
        "mlflow.end_run()"
    )
    result = adatt(
        "submit",
        "--address",
        ray_head.address,
        "--wait",
        "--",
        "python",
        "-c",
        script,
        env=ray_head.client_env(MLFLOW_TRACKING_URI=mlflow_server),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("submit-smoke")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.data.metrics["answer"] for r in runs] == [42.0]
    assert runs[0].info.run_name == "from-job"


def test_jobs_lists_and_stop_stops_a_running_job(ray_head):
    env = ray_head.client_env()
    result = adatt(
        "submit",
        "--address",
        ray_head.address,
        "--",
        "python",
        "-c",
        "import time; print('sleeping', flush=True); time.sleep(120)",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stderr.split("job ", 1)[1].split(":", 1)[0]
    listed = adatt("jobs", "--address", ray_head.address, env=env)
    assert listed.returncode == 0, listed.stderr
    assert any(line.startswith(job_id) for line in listed.stdout.splitlines())

    stopped = adatt("stop", job_id, "--address", ray_head.address, env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert "stop requested" in stopped.stdout
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listed = adatt("jobs", "--address", ray_head.address, env=env)
        line = next(x for x in listed.stdout.splitlines() if x.startswith(job_id))
        if "STOPPED" in line:
            break
        time.sleep(1)
    assert "STOPPED" in line

    again = adatt("stop", "raysubmit_doesnotexist", "--address", ray_head.address, env=env)
    assert again.returncode == 2
    assert "no job 'raysubmit_doesnotexist'" in again.stderr


def test_missing_or_wrong_token_explains_the_fix(ray_head):
    no_token = adatt(
        "jobs", "--address", ray_head.address, env=ray_head.client_env(RAY_AUTH_MODE="disabled")
    )
    assert no_token.returncode == 2
    assert "requires token authentication and no token was sent" in no_token.stderr
    assert "RAY_AUTH_TOKEN" in no_token.stderr

    wrong = adatt(
        "jobs", "--address", ray_head.address, env=ray_head.client_env(RAY_AUTH_TOKEN="wrong")
    )
    assert wrong.returncode == 2
    assert "rejected the auth token from RAY_AUTH_TOKEN" in wrong.stderr
    assert "wrong" not in wrong.stderr  # the token value is never printed


def test_unreachable_cluster_is_one_clear_line(ray_head):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: nothing answers
        result = adatt("jobs", "--address", f"http://127.0.0.1:{port}", env=ray_head.client_env())
    assert result.returncode == 2
    assert result.stderr.startswith("error: no Ray job server answers at http://127.0.0.1:")


def _training_available() -> bool:
    return (
        importlib.util.find_spec("pipeline.training.driver") is not None
        and (REPO_ROOT / "configs" / "synthetic.yaml").is_file()
    )


@pytest.mark.skipif(
    not _training_available(), reason="needs pipeline.training and configs/synthetic.yaml"
)
def test_submit_adatt_train_logs_to_mlflow_and_checkpoints(ray_head, mlflow_server, tmp_path):
    env = ray_head.client_env()
    logs = tmp_path / "logs"
    generated = adatt("generate", "--out", str(logs), "--rows", "3000", env=env)
    assert generated.returncode == 0, generated.stderr
    storage = tmp_path / "runs"
    result = adatt(
        "submit",
        "--address",
        ray_head.address,
        "--wait",
        "--",
        "adatt",
        "train",
        "--config",
        "configs/synthetic.yaml",
        "--set",
        f"data.path={logs}",
        "--set",
        f"tracking.tracking_uri={mlflow_server}",
        "--set",
        "tracking.experiment=submit-train",
        "--set",
        f"train.storage_path={storage}",
        "--set",
        "train.epochs=1",
        "--set",
        "train.num_workers=1",
        "--set",
        "model.expert_dims=[16, 8]",
        "--set",
        "model.tower_dims=[8]",
        env=env,
        timeout=280,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SUCCEEDED" in result.stderr

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("submit-train")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED"
    assert any(k.startswith("val/") for k in runs[0].data.metrics)
    assert [p for p in storage.rglob("checkpoint_*") if p.is_dir()]


def test_joining_a_token_cluster_without_its_token_is_one_line(ray_head, tmp_path):
    """`adatt train` with RAY_ADDRESS naming a cluster that wants a token this shell lacks:
    exit 2 and one line saying what to set, within seconds, before any run or store is
    made (b69f646 retried for ~20 s and printed a 20-line ConnectionError traceback)."""
    from bench.harness import TINY_OVERRIDES
    from pipeline.datasets.synthetic import generate_logs

    generate_logs(tmp_path / "logs", rows=500, seed=0)
    env = {**ray_head.client_env(), "RAY_ADDRESS": ray_head.gcs_address}
    env.pop("RAY_AUTH_TOKEN_PATH")
    sets = [f"data.path={tmp_path / 'logs'}", f"train.storage_path={tmp_path / 'runs'}"]
    sets += [f"tracking.tracking_uri=sqlite:///{tmp_path / 'store' / 'mlflow.db'}"]
    (tmp_path / "store").mkdir()
    started = time.monotonic()
    result = adatt(
        "train", "-c", str(REPO_ROOT / "configs" / "synthetic.yaml"),
        *[arg for item in [*sets, *TINY_OVERRIDES] for arg in ("--set", item)],
        env=env,
    )  # fmt: skip
    assert time.monotonic() - started < 60
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: RAY_ADDRESS={ray_head.gcs_address}: the Ray cluster ")
    assert "wants an auth token" in lines[-1] and "RAY_AUTH_TOKEN" in lines[-1]
    assert "Traceback" not in result.stderr and "gcs_client" not in result.stderr
    assert list((tmp_path / "store").iterdir()) == []  # no MLflow store, no run
    assert not (tmp_path / "runs").exists()
