"""`adatt predict`: batch scoring of raw interaction logs with a registered model.

Ray Data streams the input: `read_parquet` -> `map_batches` on a pool of actors that each
load the MLflow model once -> `write_parquet`, one score column per task plus the
passthrough columns the user names. The input's schema is checked from the Parquet footers
before any work starts, and nothing is written when it is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow.parquet as pq
import ray

from pipeline.config import DataConfig
from pipeline.errors import InputError
from pipeline.schema import check_schema, resolve_files


@dataclass
class ModelSpec:
    """What a logged scoring model expects: its data config and its tasks."""

    data: DataConfig
    tasks: list[str]


def load_spec(model_uri: str) -> ModelSpec:
    """Read the model's spec (features, tasks) without loading the network."""
    try:
        folder = mlflow.artifacts.download_artifacts(f"{model_uri.rstrip('/')}/artifacts/spec.json")
    except Exception as err:
        raise InputError(f"--model {model_uri}: cannot read the model ({err})") from None
    spec = json.loads(Path(folder).read_text())
    data = DataConfig.model_validate(spec["preprocessor"]["data"])
    return ModelSpec(data=data, tasks=[name for name, _ in spec["tasks"]])


class _Scorer:
    """A Ray Data actor: loads the pyfunc model once, then scores pandas batches."""

    def __init__(
        self, model_uri: str, tracking_uri: str, features: list[str], passthrough: list[str]
    ) -> None:
        mlflow.set_tracking_uri(tracking_uri)
        self.model = mlflow.pyfunc.load_model(model_uri)
        self.features = features
        self.passthrough = passthrough

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        scores = self.model.predict(batch[self.features])
        kept = batch[self.passthrough].reset_index(drop=True)
        return pd.concat([kept, scores.reset_index(drop=True)], axis=1)


def predict(
    model_uri: str,
    input_path: str,
    output_path: str,
    tracking_uri: str,
    passthrough: list[str] | None = None,
    batch_size: int = 4096,
    actors: int = 1,
    use_gpu: bool = False,
) -> int:
    """Score every row of `input_path` with `model_uri` into Parquet under `output_path`.

    Returns the number of rows written. Raises InputError, before writing anything, when an
    input column is missing or mistyped, or when `output_path` already holds files.
    """
    mlflow.set_tracking_uri(tracking_uri)
    spec = load_spec(model_uri)
    passthrough = list(passthrough or [])
    clash = sorted(set(passthrough) & set(spec.tasks))
    if clash:
        raise InputError(f"--passthrough {clash}: names clash with the model's score columns")
    output = Path(output_path)
    if "://" not in output_path and output.exists() and any(output.iterdir()):
        raise InputError(f"--output {output_path}: folder is not empty; choose a new one")
    check = spec.data.model_copy(update={"path": input_path, "passthrough": passthrough})
    files = check_schema(check, labels=False)
    columns = list(dict.fromkeys([*spec.data.feature_columns, *passthrough]))
    if not ray.is_initialized():
        ray.init(dashboard_host="127.0.0.1")
    ds = ray.data.read_parquet(files, columns=columns)
    scored = ds.map_batches(
        _Scorer,
        fn_constructor_args=(model_uri, tracking_uri, spec.data.feature_columns, passthrough),
        batch_size=batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
    )
    scored.write_parquet(output_path)
    return sum(pq.read_metadata(f).num_rows for f in resolve_files(output_path))


def scores_for(model_uri: str, frame: pd.DataFrame) -> pd.DataFrame:
    """In-process scoring (no Ray), for checks and small inputs."""
    return mlflow.pyfunc.load_model(model_uri).predict(frame)
