"""The project as a user installs it: a wheel (not an editable checkout) that runs the demo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import mlflow
import pytest

from tests.conftest import REPO_ROOT, TINY_OVERRIDES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # From a copy of the tracked files: the build writes build/ and *.egg-info beside them.
    source = tmp_path_factory.mktemp("source") / "adatt-trainer"
    tracked = (
        subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, tracked):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        check=True,
        timeout=600,
    )
    (found,) = out.glob("adatt_trainer-*.whl")
    return found


def test_wheel_ships_the_default_configs(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"configs/synthetic.yaml", "configs/census.yaml", "configs/tune-synthetic.yaml"} <= names
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]


@pytest.mark.long
def test_demo_runs_from_an_installed_wheel(wheel: Path, ray_cluster, tmp_path: Path) -> None:
    import ray

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), wheel],
        check=True,
        timeout=600,
    )
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    # The demo's own defaults: no tracking URI from earlier tests (MLflow exports it).
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(
        # Only the wheel: the checkout is not importable from here. The job joins the test
        # session's Ray cluster (a second local cluster on one machine breaks Ray Train).
        PYTHONPATH=str(site),
        RAY_ADDRESS=ray.get_runtime_context().gcs_address,
    )
    sets = [f"--set={item}" for item in [*TINY_OVERRIDES, "train.epochs=1"]]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "demo", "--rows", "4000", *sets],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "MLflow run:" in done.stdout
    run_id = done.stdout.split("MLflow run:")[1].split()[0]
    client = mlflow.MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.path"] == "data/logs"
    assert sorted(p.name for p in (workdir / "data" / "logs").glob("*.parquet"))[0] == (
        "2024-01-01.parquet"
    )
