"""Logged models in MLflow, through an explicit client: log one, resolve a model URI once
to a pinned version, read one as data (`pipeline.modelfile.format`).

No process-global tracking URI is read or written: every call takes the `MlflowClient` of
the store it works on (`pipeline.tracking.runs.client_for`), and artifacts are read from
the model's own artifact location with that client's URI.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient
from mlflow.types.schema import AnyType, ColSpec, DataType, Schema
from torch import nn

from pipeline.config import DataConfig
from pipeline.data.preprocess import Preprocessor
from pipeline.errors import InputError
from pipeline.modelfile.format import (
    DATA_FOLDER,
    LEGACY_FOLDER,
    LOADER_MODULE,
    MODEL_FILES,
    PACKAGE,
    ModelData,
    package_version,
    read_model_folder,
    score_frame,
    write_model_data,
)
from pipeline.tracking.security import redact

MODEL_NAME = "model"  # the logged model's name in its run
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# Not found, or not a valid reference: the only answers that mean "there is no such model".
_ABSENT = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")
_REQUIREMENTS = ("torch", "numpy", "pandas", "pyarrow", "pydantic", "pyyaml", "mlflow")


@dataclass(frozen=True)
class ModelRef:
    """A model URI resolved once: every later read uses this exact model.

    Attributes:
        given: the URI as given (`models:/NAME@ALIAS`, `models:/NAME/VERSION`,
            `models:/m-...`, `runs:/RUN_ID/model` or a run id).
        uri: the pinned URI: `models:/NAME/VERSION` for a registered version, else
            `models:/m-...` (or `runs:/...` for a model logged before MLflow 3).
        artifact_location: where its files are.
        name, version: the registered model and version, when it is one.
        run_id: the run that logged it.
    """

    given: str
    uri: str
    artifact_location: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None


def is_absent(err: MlflowException) -> bool:
    """Whether the server said that the model (or alias, version, run) does not exist."""
    return err.error_code in _ABSENT


def _from_version(given: str, mv: Any, client: MlflowClient) -> ModelRef:
    if getattr(mv, "model_id", None):
        location = client.get_logged_model(mv.model_id).artifact_location
    else:
        location = client.get_model_version_download_uri(mv.name, mv.version)
    pinned = f"models:/{mv.name}/{mv.version}"
    return ModelRef(given, pinned, location, mv.name, str(mv.version), mv.run_id)


def _from_run(given: str, run_id: str, path: str, client: MlflowClient) -> ModelRef:
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{path}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
    )
    if found:
        model = found[0]
        return ModelRef(given, f"models:/{model.model_id}", model.artifact_location, run_id=run_id)
    location = f"{run.info.artifact_uri.rstrip('/')}/{path}"  # logged before MLflow 3
    return ModelRef(given, f"runs:/{run_id}/{path}", location, run_id=run_id)


def resolve_model(uri: str, client: MlflowClient, flag: str = "--model") -> ModelRef:
    """Resolve a model URI once, to a pinned model.

    Raises:
        InputError: naming `flag`, when the URI is malformed or names nothing that exists.
        MlflowException: any other answer of the server (an error, a refusal), which says
            nothing about whether the model exists.
    """
    given = uri.strip()
    try:
        if _RUN_ID.match(given):
            return _from_run(given, given, MODEL_NAME, client)
        if given.startswith("runs:/"):
            run_id, _, path = given.removeprefix("runs:/").partition("/")
            return _from_run(given, run_id, path.strip("/") or MODEL_NAME, client)
        rest = given.removeprefix("models:/")
        if given.startswith("models:/m-"):
            model = client.get_logged_model(rest)
            return ModelRef(given, given, model.artifact_location, run_id=model.source_run_id)
        if given.startswith("models:/") and "@" in rest:
            name, _, alias = rest.partition("@")
            return _from_version(given, client.get_model_version_by_alias(name, alias), client)
        if given.startswith("models:/") and rest.count("/") == 1:
            name, number = rest.split("/")
            return _from_version(given, client.get_model_version(name, number), client)
    except MlflowException as err:
        if is_absent(err):
            first = err.message.splitlines()[0] if err.message else err.error_code
            raise InputError(f"{flag} {given}: not found ({first})") from None
        raise
    raise InputError(
        f"{flag} {given}: expected models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-ID, "
        "runs:/RUN_ID/model or a run id"
    )


def _repository(ref: ModelRef, client: MlflowClient) -> Any:
    return get_artifact_repository(ref.artifact_location, client.tracking_uri, client.tracking_uri)


def download_model(ref: ModelRef, client: MlflowClient, folder: Path, weights: bool = True) -> Path:
    """Download the files a reader needs (never the rest: no code) into `folder`."""
    repository = _repository(ref, client)
    names = {Path(item.path).name for item in repository.list_artifacts("")}
    if "data" in names:
        files = [f"data/{DATA_FOLDER}/{f}" for f in MODEL_FILES] + ["MLmodel"]
    elif LEGACY_FOLDER in names:
        files = [f"{LEGACY_FOLDER}/{f}" for f in MODEL_FILES]
    else:
        raise InputError(f"{ref.given}: not an adatt model (its folder holds {sorted(names)})")
    if not weights:
        files = [f for f in files if not f.endswith(MODEL_FILES[1])]
    for file in files:  # each lands at folder/<file>
        repository.download_artifacts(file, dst_path=str(folder))
    return folder


def read_model(ref: ModelRef, client: MlflowClient, weights: bool = True) -> ModelData:
    """The model `ref` names, read as data from a private download (the store is never
    written); without `weights`, its spec only (the weights dict is then empty)."""
    with tempfile.TemporaryDirectory(prefix="adatt-model-") as tmp:
        folder = download_model(ref, client, Path(tmp), weights)
        try:
            return read_model_folder(folder, ref.uri, weights)
        except InputError as err:  # name the file by its place in the model, not the copy
            raise InputError(str(err).replace(tmp, ref.uri)) from None


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
    """The model signature, declared per feature role rather than inferred from the
    example's dtypes (MLflow refuses integer columns holding nulls, and int64 -> float64):
    dense features trained from a float or an integer of up to 32 bits are `double` (NaN
    allowed: imputed or refused per feature); string ids are `string`; any other feature
    (integer ids, int64 numbers, lists) is `Any`, which the preprocessing validates and
    hashes itself, as in training. Scores are `float`."""
    dense = {f.column for f in data.dense}
    inputs = [
        ColSpec(_dense_type(example[c]) if c in dense else _id_type(example[c]), c, required=True)
        for c in data.feature_columns
    ]
    outputs = [ColSpec(DataType.float, c) for c in scores.columns]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def _requirements() -> list[str]:
    from importlib.metadata import version

    pins = [f"{n}=={version(n)}".replace("+cpu", "") for n in _REQUIREMENTS]
    return [*pins, f"{PACKAGE}=={package_version()}"]  # the package holds the loader


def log_model(
    client: MlflowClient,
    run_id: str,
    network: nn.Module,
    model_config: dict[str, Any],
    preprocessor: Preprocessor,
    example: pd.DataFrame,
) -> str:
    """Log the scoring model of run `run_id` (as data: `pipeline.modelfile.format`); return its URI
    (`models:/m-...`).

    Args:
        client: the client of the store holding the run.
        network: the trained network, weights as selected.
        model_config: the `model:` config section, as JSON.
        preprocessor: the fitted preprocessing of the run.
        example: a few raw rows (feature columns) in their training types.
    """
    experiment = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(
        experiment, name=MODEL_NAME, source_run_id=run_id, model_type="adatt"
    )
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    scores = score_frame(network, preprocessor, preprocessor.data.tasks, example)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_model_data(Path(tmp) / "stage", network, model_config, preprocessor, example)
        metadata = Model(
            artifact_path=logged.artifact_location,
            model_uuid=logged.model_id,
            run_id=run_id,
            model_id=logged.model_id,
        )
        mlflow.pyfunc.save_model(
            str(Path(tmp) / MODEL_NAME),
            loader_module=LOADER_MODULE,
            data_path=str(data),
            mlflow_model=metadata,
            signature=scoring_signature(preprocessor.data, example, scores),
            input_example=example,
            pip_requirements=_requirements(),
        )
        client.log_model_artifacts(logged.model_id, str(Path(tmp) / MODEL_NAME))
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return f"models:/{logged.model_id}"


def describe(ref: ModelRef) -> str:
    """One line naming a resolved model (credentials in its location redacted)."""
    where = f" (run {ref.run_id})" if ref.run_id else ""
    return f"{ref.uri}{where} at {redact(ref.artifact_location)}"
