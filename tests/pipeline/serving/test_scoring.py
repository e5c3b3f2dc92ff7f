"""The logged scoring model: raw rows in, the network's scores out; stored as code plus a
state dict; a signature that accepts what training accepted (null ids, narrow ints)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.types.schema import AnyType, DataType

from pipeline.data.sample import read_split
from pipeline.serving.scoring import read_spec, score_frame
from tests.conftest import log_untrained_run, registry_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def logged(untrained_run, mlflow_server):
    """The untrained tiny network's run (tests/conftest.py) and its test-split rows."""
    # Other test modules point MLflow elsewhere; `models:/` URIs resolve on this server.
    mlflow.set_tracking_uri(mlflow_server)
    run = untrained_run
    columns = run.config.data.feature_columns
    rows = read_split(run.config.data, run.files, "test", columns).to_pandas()
    return run.model_uri, run.network, run.preprocessor, run.tasks, rows


def test_pyfunc_scores_raw_rows_like_the_network(logged) -> None:
    uri, network, preprocessor, tasks, rows = logged
    scores = mlflow.pyfunc.load_model(uri).predict(rows)
    direct = score_frame(network, preprocessor, tasks, rows)
    assert list(scores.columns) == ["click", "like", "share", "watch_time"]
    assert len(scores) == len(rows) > 100
    np.testing.assert_allclose(scores.to_numpy(), direct.to_numpy(), atol=1e-6)
    binary = scores[["click", "like", "share"]].to_numpy()
    assert ((binary > 0) & (binary < 1)).all()
    # The sigmoid is applied to binary tasks only.
    logits = network(
        {k: torch.from_numpy(v) for k, v in preprocessor.transform(rows, False).items()}
    )
    np.testing.assert_allclose(scores["watch_time"], logits[:, 3].detach().numpy(), atol=1e-6)


def test_model_is_code_plus_state_dict_and_spec(logged, tmp_path: Path) -> None:
    uri = logged[0]
    folder = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path)))
    flavour = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavour["model_code_path"].endswith("scoring_model.py")
    assert not list(folder.rglob("*.pkl")) and not list(folder.rglob("__pycache__"))
    assert {p.name for p in (folder / "code").iterdir()} == {"models", "pipeline"}
    weights = torch.load(folder / "artifacts" / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in weights.values())
    spec = read_spec(uri)
    assert [t[0] for t in spec["tasks"]] == ["click", "like", "share", "watch_time"]
    assert spec["preprocessor"]["dense_stats"]["position"]["count"] > 0
    assert "torch==" in (folder / "requirements.txt").read_text()


def test_signature_types_by_role_and_nulls_accepted(logged) -> None:
    uri, network, preprocessor, tasks, rows = logged
    model = mlflow.pyfunc.load_model(uri)
    inputs = {c.name: c.type for c in model.metadata.get_input_schema().inputs}
    # Integer ids accept any type (nulls arrive as float NaN); strings stay strings; the
    # int16 `position` and float dense columns are doubles.
    assert isinstance(inputs["user_id"], AnyType) and isinstance(inputs["hour"], AnyType)
    assert inputs["device"] == DataType.string
    assert inputs["position"] == inputs["item_age_hours"] == DataType.double
    outputs = {c.name: c.type for c in model.metadata.get_output_schema().inputs}
    assert outputs == dict.fromkeys(["click", "like", "share", "watch_time"], DataType.float)

    head = rows.head(6).copy()
    head["user_id"] = head["user_id"].astype("float64")
    head.loc[head.index[:3], "user_id"] = np.nan  # a null id: float NaN in pandas
    head.loc[head.index[:2], "device"] = None
    scores = model.predict(head)
    # Nulls hash to the same bucket as Arrow nulls did in training.
    as_arrow = pd.DataFrame(
        {
            **{c: head[c] for c in head.columns},
            "user_id": pd.array([None] * 3 + list(rows["user_id"].iloc[3:6]), dtype="Int64"),
        }
    )
    direct = score_frame(network, preprocessor, tasks, as_arrow)
    np.testing.assert_allclose(scores.to_numpy(), direct.to_numpy(), atol=1e-6)

    with pytest.raises(MlflowException, match="position"):
        model.predict(rows.drop(columns=["position"]).head(3))


def _stored_files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


_LOAD_AND_SCORE = """
import sys
import mlflow
import pandas as pd
from pipeline.serving.scoring import load_scoring_model
load = mlflow.pyfunc.load_model if sys.argv[1] == "mlflow" else load_scoring_model
print(len(load(sys.argv[2]).predict(pd.read_parquet(sys.argv[3]))))
"""


def test_reading_a_model_never_writes_into_the_artifact_store(
    tiny_logs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A local store (sqlite + file:// artifacts, the default) is where MLflow loads a model in
    # place. Bytecode on throughout, as on a new machine: logging runs the staged model, and
    # loading in a fresh process imports the stored scoring_model.py and code/ packages.
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)  # MLflow's subprocesses
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = log_untrained_run(uri, tiny_logs, tmp_path)
    client = registry_client(uri)
    client.create_registered_model("adatt")
    client.create_model_version("adatt", run.model_uri, run_id=run.run_id)
    client.set_registered_model_alias("adatt", "champion", "1")
    store = tmp_path / "mlartifacts"
    before = _stored_files(store)
    assert any(name.endswith("scoring_model.py") for name in before)
    assert not [name for name in before if "__pycache__" in name]

    rows = tmp_path / "rows.parquet"
    columns = run.config.data.feature_columns
    read_split(run.config.data, run.files, "test", columns).slice(0, 7).to_pandas().to_parquet(rows)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    for loader, model_uri in [("adatt", "models:/adatt/1"), ("adatt", "models:/adatt@champion")]:
        _load_in_fresh_process(loader, model_uri, rows, env)
        assert _stored_files(store) == before, model_uri  # `adatt predict`'s loader: a copy

    # MLflow's own loader reads a local store in place: it runs the stored code there (no
    # bytecode may appear) and adds its `registered_model_meta` (see docs/registry.md).
    for _ in range(2):
        _load_in_fresh_process("mlflow", "models:/adatt@champion", rows, env)
        after = _stored_files(store)
        added = set(after) - set(before)
        assert [Path(name).name for name in added] == ["registered_model_meta"]
        assert {name: after[name] for name in before} == before


def _load_in_fresh_process(loader: str, model_uri: str, rows: Path, env: dict) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_SCORE, loader, model_uri, str(rows)],
        env=env,
        cwd=rows.parent,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "7"
