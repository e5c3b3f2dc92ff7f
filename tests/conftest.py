"""Shared fixtures: one local Ray cluster per test session (2 CPUs, like CI), tiny synthetic
logs, and a tiny training config built from `configs/synthetic.yaml`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Ray workers import the project from the checkout even when it is not pip-installed.
REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
)

TINY_OVERRIDES = [
    "model.expert_dims=[16, 8]",
    "model.tower_dims=[8]",
    "model.experts_per_task=2",
    "model.shared_experts=1",
    "train.epochs=2",
    "train.num_workers=2",
    "train.lr=0.01",
    "data.batch_size=256",
]


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray cluster shared by every test that needs one."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 6,000 synthetic interaction-log rows."""
    from pipeline.synthetic import generate_logs

    out = tmp_path_factory.mktemp("logs")
    generate_logs(out, rows=6000, seed=0)
    return out


def tiny_config(logs: Path, workdir: Path, *overrides: str):
    """The synthetic config shrunk for tests; MLflow and checkpoints under `workdir`."""
    from pipeline.config import load_config

    return load_config(
        REPO_ROOT / "configs" / "synthetic.yaml",
        [
            f"data.path={logs}",
            f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db",
            f"train.storage_path={workdir}/runs",
            *TINY_OVERRIDES,
            *overrides,
        ],
    )
