"""Security basics: checkpoints never unpickle code, credentials never reach MLflow through
config URIs, and a local Ray dashboard listens on loopback only.

(That no environment secret reaches a run's params, tags or artifacts is checked on a real
training in `test_reliability_e2e.py`, which shares its trained runs.)
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import parse_config
from pipeline.errors import ConfigError, InputError
from pipeline.ports import PORTS_FROM, ephemeral_start
from pipeline.tracking.security import check_no_credentials, has_credentials
from pipeline.training.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from tests.conftest import REPO_ROOT


class _Payload:
    """Pickles to "open(marker, 'w')": loading it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _state() -> TrainingState:
    return TrainingState(
        model={"w": torch.ones(2)}, loss={}, optimizer={}, epoch=1, config={}, preprocessor={}
    )


def test_checkpoint_holding_a_pickled_object_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    save_checkpoint(_state(), good)
    assert torch.equal(load_checkpoint(good).model["w"], torch.ones(2))

    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "code-ran"
    torch.save({**_state().__dict__, "history": [_Payload(marker)]}, evil / "checkpoint.pt")
    with pytest.raises(InputError, match=r"evil/checkpoint.pt: not a readable checkpoint .*"):
        load_checkpoint(evil)
    assert not marker.exists()
    # The payload is live: a full unpickle would have run it.
    torch.load(evil / "checkpoint.pt", weights_only=False)
    assert marker.exists()


def test_project_code_loads_weights_only() -> None:
    """Every torch.load in the project passes weights_only=True; nothing calls pickle.load."""
    calls = []
    packages = ("models", "pipeline", "tune", "cluster")
    for path in [p for package in packages for p in REPO_ROOT.glob(f"{package}/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = getattr(node.func.value, "id", None)
            if (owner, node.func.attr) == ("torch", "load"):
                flags = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                calls.append((path.name, flags.get("weights_only")))
            assert (owner, node.func.attr) not in {("pickle", "load"), ("pickle", "loads")}
    assert calls and all(weights_only is True for _, weights_only in calls), calls


@pytest.mark.parametrize(
    ("uri", "found"),
    [
        ("s3://AKIAEXAMPLE:secret@bucket/logs", True),
        ("http://user:password@mlflow:5000", True),
        ("https://token@mlflow.example.com", True),
        ("s3://bucket/logs?access_key=AKIA&secret_key=x", True),
        ("abfs://c@account.dfs.core.windows.net/x?sv=2024&sig=abc", True),
        ("s3://bucket/logs?region=eu-west-1", False),
        ("http://mlflow:5000", False),
        ("sqlite:////tmp/mlflow.db", False),
        ("data/logs", False),
        ("/mnt/cluster_storage/runs", False),
    ],
)
def test_credentials_in_uris_are_found(uri: str, found: bool) -> None:
    assert has_credentials(uri) is found


@pytest.mark.parametrize(
    ("section", "value", "field"),
    [
        ("data", {"path": ["logs", "s3://K:S@b/logs"]}, "data.path"),
        ("train", {"storage_path": "gs://b/runs?token=abc"}, "train.storage_path"),
        ("tracking", {"tracking_uri": "http://me:pw@mlflow:5000"}, "tracking.tracking_uri"),
    ],
)
def test_config_with_credentials_is_refused_naming_the_field(section, value, field) -> None:
    raw = {"data": {"categorical": [{"column": "user_id"}], "tasks": [{"name": "click"}]}}
    raw.setdefault(section, {}).update(value)
    with pytest.raises(ConfigError, match=rf"^{field}: the URI holds credentials") as err:
        check_no_credentials(parse_config(raw))
    assert "pw" not in str(err.value) and "S@" not in str(err.value)


DASHBOARD_PROBE = """
import json, os, psutil, ray
from pipeline.session import start_ray
start_ray()
try:
    url = ray._private.worker.global_worker.node.address_info["webui_url"]
    port = int(url.rsplit(":", 1)[1])
    listening = sorted({c.laddr.ip for c in psutil.net_connections("tcp")
                        if c.status == psutil.CONN_LISTEN and c.laddr.port == port})
    gcs = int(os.environ["RAY_ADDRESS"].rsplit(":", 1)[1])
    print("PROBE " + json.dumps({"url": url, "listening": listening, "gcs": gcs}))
finally:
    ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_ray_dashboard_listens_on_loopback_only() -> None:
    """`adatt train`'s own local cluster (no RAY_ADDRESS): dashboard on 127.0.0.1 only; its
    head on a port below the kernel's ephemeral range (`pipeline.ports`)."""
    # "local": start a cluster, never join one another user started on this machine.
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", DASHBOARD_PROBE],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("PROBE ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    probe = json.loads(lines[0][len("PROBE ") :])
    assert probe["url"].startswith("127.0.0.1:")
    assert probe["listening"] == ["127.0.0.1"]
    ephemeral_from = ephemeral_start()
    assert PORTS_FROM <= probe["gcs"] < ephemeral_from


@pytest.mark.parametrize(
    "command",
    [
        ["register", "--run", "0" * 32],
        ["evaluate", "--model", "models:/a@b", "--model", "models:/a@c", "--data", "x"],
        ["predict", "--model", "models:/a@b", "--input", "x", "--output", "y"],
    ],
    ids=["register", "evaluate", "predict"],
)
def test_a_uri_with_credentials_is_printed_redacted(command: list[str]) -> None:
    """A tracking URI from the environment may carry a password; an error quoting it
    shows `***` in its place (here: nothing listens on the port)."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    uri = "http://alice:hunter2-secret@127.0.0.1:9/?token=tok-secret"
    result = CliRunner().invoke(app, command, env={"MLFLOW_TRACKING_URI": uri})
    assert result.exit_code == 2, result.output
    assert "http://***:***@127.0.0.1:9/?token=***" in result.stderr, result.stderr
    assert "secret" not in result.output
