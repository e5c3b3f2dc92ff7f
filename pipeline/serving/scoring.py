"""The logged MLflow model: raw interaction-log rows in, one score per task out.

A pyfunc model logged as code (`pipeline/serving/scoring_model.py`, no pickled classes) with two
artifacts: `spec.json` (model config, feature schema, task types, the preprocessor's data
config and dense statistics) and `weights.pt`, a state dict loaded with
`weights_only=True`. It scores raw rows exactly as training saw them: the same hashing and
dense transforms (`Preprocessor.transform`), the network, then a sigmoid for binary tasks.
The `models` and `pipeline` packages travel with the model (`code_paths`), so
`mlflow.pyfunc.load_model` works in any Python process with the pinned requirements.

Signature: declared per feature role rather than inferred from the example's dtypes,
because MLflow refuses integer columns holding nulls (pandas turns them into float NaN) and
refuses int64 -> float64. Dense features whose training type is a float or an integer of up
to 32 bits are `double` (NaN allowed: the model imputes or refuses it per feature); string
ids are `string`; any other feature (integer ids, which may hold nulls, int64 numbers,
lists) is `Any`: the preprocessing validates and hashes those itself, as in training.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import weakref
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.types.schema import AnyType, ColSpec, DataType, Schema

import models
import pipeline
from models import build_model
from models.config import FeatureSchema
from pipeline.config import DataConfig
from pipeline.data.preprocess import Preprocessor

MODEL_NAME = "model"
SPEC_ARTIFACT = "spec"  # stored as artifacts/spec.json in the model folder
WEIGHTS_ARTIFACT = "weights"
MODEL_CODE = Path(__file__).with_name("scoring_model.py")
_PACKAGES = (Path(models.__file__).parent, Path(pipeline.__file__).parent)
_REQUIREMENTS = ("torch", "numpy", "pandas", "pyarrow", "pydantic", "pyyaml", "mlflow")


def score_frame(
    network: torch.nn.Module,
    preprocessor: Preprocessor,
    task_types: list[tuple[str, str]],
    frame: pd.DataFrame,
) -> pd.DataFrame:
    """Scores for raw rows: probabilities for binary tasks, values for regression.

    Args:
        network: the multi-task network (on CPU or GPU; inputs follow its device).
        preprocessor: the fitted preprocessing of the training run.
        task_types: `(task name, "binary" | "regression")` in the network's output order.
        frame: raw rows holding at least the feature columns.

    Example:
        >>> score_frame(net, pre, [("click", "binary")], rows).columns.tolist()  # doctest: +SKIP
        ['click']
    """
    device = next(network.parameters()).device
    arrays = preprocessor.transform(frame, with_labels=False)
    batch = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}
    network.eval()
    with torch.no_grad():
        outputs = network(batch).float()
    scores = {}
    for i, (name, kind) in enumerate(task_types):
        column = torch.sigmoid(outputs[:, i]) if kind == "binary" else outputs[:, i]
        scores[name] = column.cpu().numpy().astype(np.float32)
    return pd.DataFrame(scores, index=frame.index)


class MultiTaskScorer(mlflow.pyfunc.PythonModel):
    """pyfunc model: `predict(DataFrame of raw rows) -> DataFrame of task scores`.

    Runs on a GPU when the process sees one (a Ray actor given `num_gpus=1`), else on CPU.
    """

    def load_context(self, context: Any) -> None:
        spec = json.loads(Path(context.artifacts[SPEC_ARTIFACT]).read_text())
        self.task_types = [tuple(t) for t in spec["tasks"]]
        self.preprocessor = Preprocessor.from_dict(spec["preprocessor"])
        network = build_model(spec["model"], FeatureSchema.from_dict(spec["schema"]))
        weights = torch.load(
            context.artifacts[WEIGHTS_ARTIFACT], map_location="cpu", weights_only=True
        )
        network.load_state_dict(weights)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.network = network.to(device).eval()

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        return score_frame(self.network, self.preprocessor, self.task_types, model_input)


def _dense_type(values: pd.Series) -> DataType | AnyType:
    kind, size = values.dtype.kind, values.dtype.itemsize
    # MLflow converts float32 and int8..int32 to float64 but refuses int64 as lossy.
    return DataType.double if kind == "f" or (kind in "iu" and size <= 4) else AnyType()


def _id_type(values: pd.Series) -> DataType | AnyType:
    text = pd.api.types.infer_dtype(values, skipna=True) == "string"
    return DataType.string if text else AnyType()


def scoring_signature(
    data: DataConfig, example: pd.DataFrame, scores: pd.DataFrame
) -> ModelSignature:
    """The model signature: feature columns typed by role (module docstring), float scores.

    Args:
        data: the training data config (which column is dense, categorical or multi-hot).
        example: raw training rows, holding the columns with their training types.
        scores: the model's output for `example`.
    """
    dense = {f.column for f in data.dense}
    inputs = [
        ColSpec(_dense_type(example[c]) if c in dense else _id_type(example[c]), c, required=True)
        for c in data.feature_columns
    ]
    outputs = [ColSpec(DataType.float, c) for c in scores.columns]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def _requirements() -> list[str]:
    return [f"{n}=={version(n)}".replace("+cpu", "") for n in _REQUIREMENTS]


def _stage_code(folder: Path) -> list[str]:
    """Copies of the `models` and `pipeline` packages without bytecode, for `code_paths`."""
    staged = []
    for package in _PACKAGES:
        target = folder / package.name
        shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        staged.append(str(target))
    return staged


@contextlib.contextmanager
def _no_bytecode() -> Iterator[None]:
    """No `.pyc` files written while inside: MLflow runs the model's code from the folder it
    uploads (to check the input example), and bytecode must not end up in the stored model."""
    before = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = before


def load_scoring_model(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    """Load a logged scoring model from a private copy, never from the artifact store itself.

    MLflow loads a model in place when it sits in a local artifact store; a copy keeps the
    stored model byte-identical whatever the loading process writes. The copy is removed
    when the returned model is garbage-collected.

    Args:
        model_uri: any model URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`,
            `models:/m-...`, `runs:/RUN_ID/model`).
    """
    folder = tempfile.mkdtemp(prefix="adatt-model-")
    model = mlflow.pyfunc.load_model(model_uri, dst_path=folder)
    weakref.finalize(model, shutil.rmtree, folder, ignore_errors=True)
    return model


def log_scoring_model(
    run_id: str,
    network: torch.nn.Module,
    model_config: dict[str, Any],
    schema: FeatureSchema,
    task_types: list[tuple[str, str]],
    preprocessor: Preprocessor,
    example: pd.DataFrame,
) -> str:
    """Log the scoring model, with signature and input example, to run `run_id`.

    Args:
        run_id: the MLflow run (the active tracking URI's) that gets the model `model`.
        network: the trained network, weights as selected.
        model_config: the `model:` config section, as JSON.
        schema: the feature schema the network was built with.
        task_types: `(task name, "binary" | "regression")` in output order.
        preprocessor: the fitted preprocessing of the run.
        example: a few raw rows (feature columns) in their training types.

    Returns:
        The logged model's URI (`models:/m-...`).
    """
    spec = {
        "model": model_config,
        "schema": schema.to_dict(),
        "tasks": [list(t) for t in task_types],
        "preprocessor": preprocessor.to_dict(),
    }
    scores = score_frame(network, preprocessor, task_types, example)
    with tempfile.TemporaryDirectory() as folder:
        spec_path = Path(folder) / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        weights_path = Path(folder) / "weights.pt"
        torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, weights_path)
        with _no_bytecode(), mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(MODEL_CODE),
                artifacts={SPEC_ARTIFACT: str(spec_path), WEIGHTS_ARTIFACT: str(weights_path)},
                code_paths=_stage_code(Path(folder) / "code"),
                signature=scoring_signature(preprocessor.data, example, scores),
                input_example=example,
                pip_requirements=_requirements(),
            )
    return info.model_uri


def read_spec(model_uri: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """The `spec.json` of a logged scoring model, without loading the model.

    Args:
        model_uri: any model URI: `models:/NAME@ALIAS`, `models:/NAME/VERSION`,
            `models:/m-...` (a logged model id) or `runs:/RUN_ID/model`.
        tracking_uri: the store (and registry) holding it; default the process's.
    """
    return json.loads(read_model_file(model_uri, "artifacts/spec.json", tracking_uri))


def read_model_file(model_uri: str, path: str, tracking_uri: str | None = None) -> bytes:
    """One file of a logged model (e.g. `artifacts/weights.pt`), downloaded to memory."""
    # The artifact repository resolves the URI to the model's folder first: a logged-model
    # id URI cannot simply be suffixed with a path the way `models:/NAME@ALIAS` can. MLflow
    # 3.x resolves `models:/m-...` with the process's tracking URI whatever it is given, so
    # that URI is pointed at the model's store meanwhile.
    with _tracking_uri(tracking_uri), tempfile.TemporaryDirectory() as folder:
        repository = get_artifact_repository(model_uri, tracking_uri, tracking_uri)
        return Path(repository.download_artifacts(path, dst_path=folder)).read_bytes()


@contextlib.contextmanager
def _tracking_uri(uri: str | None) -> Iterator[None]:
    """The process's MLflow tracking URI set to `uri` while inside (unchanged for None)."""
    if uri is None:
        yield
        return
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
