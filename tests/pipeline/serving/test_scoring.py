"""The logged model is data: raw rows in, the network's scores out; `MLmodel` names the
installed loader and no code; a signature that accepts what training accepted (null ids,
narrow ints); reading a model never writes into the store."""

from __future__ import annotations

import hashlib
import json
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
from pipeline.modelfile.format import FORMAT, LOADER_MODULE, score_frame
from pipeline.modelfile.store import read_model, resolve_model
from tests.conftest import log_untrained_run, register_version, registry_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def logged(untrained_run, mlflow_server):
    """The untrained tiny network's run (tests/conftest.py) and its test-split rows."""
    run = untrained_run
    columns = run.config.data.feature_columns
    rows = read_split(run.config.data, run.files, "test", columns).to_pandas()
    return run.model_uri, run.network, run.preprocessor, run.config.data.tasks, rows


def _pyfunc(uri: str, tracking_uri: str):
    """MLflow's own loader, as a user calls it (it reads the process's tracking URI)."""
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pyfunc.load_model(uri)


def test_pyfunc_scores_raw_rows_like_the_network(logged, mlflow_server) -> None:
    uri, network, preprocessor, tasks, rows = logged
    scores = _pyfunc(uri, mlflow_server).predict(rows)
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


def test_model_is_data_with_the_installed_loader(logged, mlflow_server, tmp_path: Path) -> None:
    uri = logged[0]
    mlflow.set_tracking_uri(mlflow_server)
    folder = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path)))
    flavour = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavour["loader_module"] == LOADER_MODULE == "pipeline.serving.loader"
    assert not flavour.get("code") and "python_model" not in flavour
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".py", ".pyc", ".pkl")]
    assert {p.name for p in (folder / "data" / "adatt").iterdir()} == {
        "spec.json",
        "weights.pt",
        "program.pt2",
    }
    weights = torch.load(folder / "data" / "adatt" / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in weights.values())
    spec = json.loads((folder / "data" / "adatt" / "spec.json").read_text())
    assert spec["format"] == FORMAT and spec["package_version"]
    assert [t["name"] for t in spec["preprocessor"]["data"]["tasks"]] == [
        "click",
        "like",
        "share",
        "watch_time",
    ]
    assert spec["preprocessor"]["dense_stats"]["position"]["count"] > 0
    requirements = (folder / "requirements.txt").read_text()
    assert "torch==" in requirements and "adatt-trainer==" in requirements


def test_signature_types_by_role_and_nulls_accepted(logged, mlflow_server) -> None:
    uri, network, preprocessor, tasks, rows = logged
    model = _pyfunc(uri, mlflow_server)
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


def test_a_model_uri_is_resolved_once_to_a_pinned_version(untrained_run, mlflow_server):
    client = registry_client(mlflow_server)
    name = "pinning"
    client.create_registered_model(name)
    for version in ("1", "2"):
        register_version(client, name, untrained_run)
        if version == "1":
            client.set_registered_model_alias(name, "champion", "1")
            ref = resolve_model(f"models:/{name}@champion", client)
            assert (ref.uri, ref.name, ref.version) == (f"models:/{name}/1", name, "1")
    client.set_registered_model_alias(name, "champion", "2")  # a promotion meanwhile
    assert read_model(ref, client).source == f"models:/{name}/1"


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
from pipeline.modelfile.store import resolve_model
from pipeline.tracking.runs import client_for
uri, tracking = sys.argv[2], sys.argv[4]
if sys.argv[1] == "mlflow":
    mlflow.set_tracking_uri(tracking)
    model = mlflow.pyfunc.load_model(uri)
else:
    client = client_for(tracking)
    model = load_scoring_model(resolve_model(uri, client), client)
print(len(model.predict(pd.read_parquet(sys.argv[3]))))
"""


def test_reading_a_model_never_writes_into_the_artifact_store(
    tiny_logs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A local store (sqlite + file:// artifacts, the default) is where MLflow loads a model in
    # place. Bytecode on throughout, as on a new machine.
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)  # MLflow's subprocesses
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = log_untrained_run(uri, tiny_logs, tmp_path)
    client = registry_client(uri)
    client.create_registered_model("adatt")
    register_version(client, "adatt", run)
    client.set_registered_model_alias("adatt", "champion", "1")
    store = tmp_path / "mlartifacts"
    before = _stored_files(store)
    assert not [name for name in before if name.endswith((".py", ".pyc"))]

    rows = tmp_path / "rows.parquet"
    columns = run.config.data.feature_columns
    read_split(run.config.data, run.files, "test", columns).slice(0, 7).to_pandas().to_parquet(rows)
    for loader, model_uri in [("adatt", "models:/adatt/1"), ("adatt", "models:/adatt@champion")]:
        _load_in_fresh_process(loader, model_uri, rows, uri)
        assert _stored_files(store) == before, model_uri  # adatt's loaders: a private copy

    # MLflow's own loader reads a local store in place and adds its `registered_model_meta`
    # (see docs/registry.md); nothing else changes, and no bytecode appears.
    for _ in range(2):
        _load_in_fresh_process("mlflow", "models:/adatt@champion", rows, uri)
        after = _stored_files(store)
        added = set(after) - set(before)
        assert [Path(name).name for name in added] == ["registered_model_meta"]
        assert {name: after[name] for name in before} == before


def _load_in_fresh_process(loader: str, model_uri: str, rows: Path, tracking: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_SCORE, loader, model_uri, str(rows), tracking],
        env=dict(os.environ),
        cwd=rows.parent,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "7"
