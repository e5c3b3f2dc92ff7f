"""Pure parts of `cluster.submit`: addresses, entrypoints, the runtime_env and its excludes."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from ray.job_submission import JobStatus

from cluster.submit import (
    PASSTHROUGH_ENV,
    build_runtime_env,
    default_address,
    exit_code,
    is_local_address,
    job_env_vars,
    project_requirements,
    rewrite_entrypoint,
)
from pipeline.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("address", "local"),
    [
        (None, True),
        ("auto", True),
        ("http://127.0.0.1:8265", True),
        ("http://localhost:8265", True),
        ("127.0.0.1:6379", True),
        ("http://[::1]:8265", True),
        ("http://head.example.com:8265", False),
        ("https://10.0.0.5:8265", False),
    ],
)
def test_is_local_address(address, local):
    assert is_local_address(address) is local


def test_default_address_order():
    assert default_address({}) == "http://127.0.0.1:8265"
    assert default_address({"RAY_ADDRESS": "http://a:8265"}) == "http://a:8265"
    env = {"RAY_ADDRESS": "http://a:8265", "RAY_API_SERVER_ADDRESS": "http://b:8265"}
    assert default_address(env) == "http://b:8265"


def test_rewrite_entrypoint():
    assert (
        rewrite_entrypoint(["adatt", "train", "--config", "c.yaml", "--set", "train.lr=[1, 2]"])
        == "python -m pipeline.cli train --config c.yaml --set 'train.lr=[1, 2]'"
    )
    assert rewrite_entrypoint(["python", "-c", "print(1)"]) == "python -c 'print(1)'"
    assert rewrite_entrypoint(["adatt train -c c.yaml && echo done"]) == (
        "python -m pipeline.cli train -c c.yaml && echo done"
    )
    assert rewrite_entrypoint(["echo $HOME"]) == "echo $HOME"  # a shell string stays raw
    assert rewrite_entrypoint(["adattx", "y"]) == "adattx y"
    with pytest.raises(InputError, match="after `--`"):
        rewrite_entrypoint([])


def test_project_requirements_match_pyproject_without_ray():
    reqs = project_requirements(REPO_ROOT / "pyproject.toml")
    assert "torch>=2.3" in reqs and "mlflow>=3.5" in reqs
    assert not [r for r in reqs if r.startswith("ray")]
    assert len(reqs) >= 10


def test_runtime_env_pip_is_opt_in():
    env = build_runtime_env(REPO_ROOT, {"A": "1"})
    assert env["working_dir"] == str(REPO_ROOT)
    assert env["env_vars"] == {"A": "1"}
    assert "pip" not in env
    assert build_runtime_env(REPO_ROOT, {}, pip=True)["pip"] == project_requirements(
        REPO_ROOT / "pyproject.toml"
    )


def test_pip_needs_a_pyproject(tmp_path):
    with pytest.raises(InputError, match="pyproject.toml not found"):
        build_runtime_env(tmp_path, {}, pip=True)


def test_excludes_keep_code_and_drop_data(tmp_path):
    # Package a fake project with Ray's own packer, as the job upload does.
    from ray._private.runtime_env.packaging import create_package

    files = [
        "pipeline/cli.py",
        "pipeline/data/__init__.py",  # a package named data is code, not data
        "configs/synthetic.yaml",
        "data/logs/part-0.parquet",
        "runs/adatt-1/checkpoint_0/model.pt",
        "mlruns/0/meta.yaml",
        "mlflow.db",
        "extra/sample.parquet",
        ".venv/bin/python",
        "pipeline/__pycache__/cli.cpython-311.pyc",
    ]
    project = tmp_path / "project"
    for name in files:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("x")
    zip_path = tmp_path / "pkg.zip"
    excludes = build_runtime_env(project, {})["excludes"]
    create_package(str(project), zip_path, include_gitignore=False, excludes=excludes)
    shipped = {n for n in zipfile.ZipFile(zip_path).namelist() if not n.endswith("/")}
    assert shipped == {"pipeline/cli.py", "pipeline/data/__init__.py", "configs/synthetic.yaml"}


def test_job_env_vars(monkeypatch):
    env = {"MLFLOW_TRACKING_URI": "http://m:5000", "HOME": "/root", "SECRET": "s"}
    assert job_env_vars(False, env=env) == {"MLFLOW_TRACKING_URI": "http://m:5000"}
    assert job_env_vars(True, ["SECRET", "X=1=2"], env=env) == {
        "MLFLOW_TRACKING_URI": "http://m:5000",
        "ADATT_REMOTE_SUBMISSION": "1",
        "SECRET": "s",
        "X": "1=2",
    }
    with pytest.raises(InputError, match="--env MISSING: not set"):
        job_env_vars(False, ["MISSING"], env=env)
    assert "RAY_AUTH_TOKEN" not in PASSTHROUGH_ENV  # tokens never ride in runtime_env


def test_exit_code():
    assert exit_code(JobStatus.SUCCEEDED) == 0
    assert {exit_code(s) for s in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.RUNNING)} == {1}
