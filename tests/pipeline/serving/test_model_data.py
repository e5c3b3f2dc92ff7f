"""A registered model is data, not code, against a real `mlflow server` (artifacts in S3):
the compatibility rule (a newer format refused naming both versions; the first releases'
models read as data, their stored code never imported), three ways of tampering with a
stored model that never run its planted code, and the `torch.export` program scoring like
`adatt predict` in a process that never imports the project's models."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from pipeline.data.sample import read_split
from pipeline.errors import InputError
from pipeline.modelfile.format import FORMAT, ModelData, score_frame
from pipeline.modelfile.store import read_model, resolve_model
from tests.conftest import registry_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _download(client, model_uri: str, target: Path) -> Path:
    ref = resolve_model(model_uri, client)
    folder = mlflow.artifacts.download_artifacts(
        artifact_uri=ref.artifact_location, dst_path=str(target), tracking_uri=client.tracking_uri
    )
    return Path(folder)


def _relog(client, folder: Path) -> str:
    """`folder` logged as a new model of a new run: the store now holds what was edited."""
    experiment = client.get_experiment_by_name("adatt").experiment_id
    run = client.create_run(experiment, run_name="edited model")
    model = client.create_logged_model(experiment, name="model", source_run_id=run.info.run_id)
    client.log_model_artifacts(model.model_id, str(folder))
    return f"models:/{model.model_id}"


class _Planted:
    """A pickled object whose loading would write the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "planted code ran"))


PLANTED = "from pathlib import Path\nPath({marker!r}).write_text('planted code ran')\n"


@pytest.fixture
def model(untrained_run, mlflow_server, tmp_path):
    """(client, the model's downloaded folder, a marker path that planted code would write)."""
    client = registry_client(mlflow_server)
    folder = _download(client, untrained_run.model_uri, tmp_path / "model")
    return client, folder, tmp_path / "marker"


def _rows(untrained_run):
    config = untrained_run.config
    columns = config.data.feature_columns
    return read_split(config.data, untrained_run.files, "test", columns).to_pandas().head(200)


def test_a_newer_format_is_refused_naming_both_versions(model, untrained_run) -> None:
    client, folder, _ = model
    spec_file = folder / "data" / "adatt" / "spec.json"
    spec = json.loads(spec_file.read_text())
    spec.update(format=FORMAT + 1, package_version="9.9.9")
    spec_file.write_text(json.dumps(spec))
    uri = _relog(client, folder)
    with pytest.raises(InputError) as err:
        read_model(resolve_model(uri, client), client)
    message = str(err.value)
    assert f"model format {FORMAT + 1}" in message and "9.9.9" in message
    assert f"format {FORMAT} and older" in message and "\n" not in message
    assert message.startswith(uri)  # the file is named by its place in the model


def _format_1(folder: Path, network_weights: Path, marker: Path) -> Path:
    """The same model in the first releases' form: a model from code, whose stored code
    (here planted) would write the marker if it were ever imported."""
    old = folder.parent / "format-1"
    (old / "artifacts").mkdir(parents=True)
    spec = json.loads((folder / "data" / "adatt" / "spec.json").read_text())
    tasks = [[t["name"], t.get("type", "binary")] for t in spec["preprocessor"]["data"]["tasks"]]
    v1 = {k: spec[k] for k in ("model", "schema", "preprocessor")} | {"tasks": tasks}
    (old / "artifacts" / "spec.json").write_text(json.dumps(v1))
    shutil.copy(network_weights, old / "artifacts" / "weights.pt")
    for package in ("models", "pipeline"):
        (old / "code" / package).mkdir(parents=True)
        (old / "code" / package / "__init__.py").write_text(PLANTED.format(marker=str(marker)))
    (old / "scoring_model.py").write_text(PLANTED.format(marker=str(marker)))
    mlmodel = {
        "flavors": {
            "python_function": {
                "python_model": "scoring_model.py",
                "code": "code",
                "loader_module": "mlflow.pyfunc.model",
                "artifacts": {
                    "spec": {"path": "artifacts/spec.json"},
                    "weights": {"path": "artifacts/weights.pt"},
                },
            }
        }
    }
    (old / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return old


def test_a_model_of_the_first_releases_is_read_as_data(model, untrained_run) -> None:
    client, folder, marker = model
    old = _format_1(folder, folder / "data" / "adatt" / "weights.pt", marker)
    uri = _relog(client, old)
    loaded = read_model(resolve_model(uri, client), client)
    assert loaded.spec["format"] == FORMAT and "tasks" not in loaded.spec  # upgraded
    rows = _rows(untrained_run)
    tasks = untrained_run.config.data.tasks
    scores = score_frame(loaded.network(), loaded.preprocessor(), loaded.tasks, rows)
    direct = score_frame(untrained_run.network, untrained_run.preprocessor, tasks, rows)
    np.testing.assert_allclose(scores.to_numpy(), direct.to_numpy(), atol=1e-7)
    assert not marker.exists()  # its code was never imported


@pytest.mark.parametrize("tamper", ["python file", "pickled weights", "MLmodel names code"])
def test_tampered_models_run_no_stored_code(model, untrained_run, tamper: str) -> None:
    client, folder, marker = model
    data = folder / "data" / "adatt"
    if tamper == "python file":
        (data / "spec_hooks.py").write_text(PLANTED.format(marker=str(marker)))
    elif tamper == "pickled weights":
        (data / "weights.pt").write_bytes(pickle.dumps(_Planted(str(marker))))
    else:
        (folder / "code").mkdir()
        (folder / "code" / "planted_loader.py").write_text(PLANTED.format(marker=str(marker)))
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
        flavor = mlmodel["flavors"]["python_function"]
        flavor.update(loader_module="planted_loader", code="code")
        (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    uri = _relog(client, folder)
    ref = resolve_model(uri, client)
    if tamper == "python file":  # ignored: only the spec and the weights are read
        loaded = read_model(ref, client)
        assert loaded.weights.keys() == untrained_run.network.state_dict().keys()
    else:
        with pytest.raises(InputError) as err:
            read_model(ref, client)
        named = "weights.pt" if tamper == "pickled weights" else "MLmodel"
        assert named in str(err.value) and "\n" not in str(err.value)
        if tamper == "MLmodel names code":
            assert "planted_loader" in str(err.value) and "refusing" in str(err.value)
    assert not marker.exists()


def test_the_exported_program_scores_like_predict_without_the_models_package(
    untrained_run, mlflow_server, tmp_path
) -> None:
    client = registry_client(mlflow_server)
    folder = _download(client, untrained_run.model_uri, tmp_path / "model")
    program = folder / "data" / "adatt" / "program.pt2"
    loaded = ModelData(
        json.loads((folder / "data" / "adatt" / "spec.json").read_text()), {}, "local"
    )
    rows = _rows(untrained_run)
    # What a serving system does first, from spec.json: the preprocessing (docs/registry.md).
    arrays = loaded.preprocessor().transform(rows, with_labels=False)
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
               tmp_path / "inputs.pt")  # fmt: skip
    code = (
        "import sys, torch\n"
        f"program = torch.export.load({str(program)!r})\n"
        f"inputs = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n"
        f"    torch.save(program.module()(inputs), {str(tmp_path / 'scores.pt')!r})\n"
        "assert 'models' not in sys.modules and 'pipeline' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    exported = torch.load(tmp_path / "scores.pt").numpy()
    tasks = untrained_run.config.data.tasks
    predicted = score_frame(untrained_run.network, untrained_run.preprocessor, tasks, rows)
    assert exported.shape == (len(rows), len(tasks))
    np.testing.assert_allclose(exported, predicted.to_numpy(), atol=1e-6)


@pytest.mark.parametrize("tamper", ["python file", "pickled weights"])
def test_mlflow_models_serve_runs_no_stored_code(
    model, untrained_run, mlflow_server, tamper: str, tmp_path
) -> None:
    """`mlflow models serve` follows `MLmodel` by MLflow's design (so write access to the
    model store is guarded like write access to code, docs/reliability.md); given a `.py`
    file beside the spec or a pickle for weights, it still imports only the installed
    loader, which reads data: it serves the first, refuses the second, runs neither."""
    from tests.conftest import free_port
    from tests.pipeline.serving.test_predict import _post, _wait_until_serving

    client, folder, marker = model
    data = folder / "data" / "adatt"
    if tamper == "python file":
        (data / "spec_hooks.py").write_text(PLANTED.format(marker=str(marker)))
    else:
        (data / "weights.pt").write_bytes(pickle.dumps(_Planted(str(marker))))
    uri = _relog(client, folder)
    port = free_port()
    log = tmp_path / "serve.log"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PATH": path}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as sink:
        server = subprocess.Popen(
            command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        if tamper == "python file":
            _wait_until_serving(f"http://127.0.0.1:{port}", server, log)
            status, body = _post(f"http://127.0.0.1:{port}", _rows(untrained_run).head(3))
            assert status == 200, body
        else:
            assert server.wait(timeout=180) != 0, log.read_text()[-3000:]
            assert "weights.pt" in log.read_text()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
    assert not marker.exists()
