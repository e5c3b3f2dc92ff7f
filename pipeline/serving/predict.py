"""`adatt predict`: batch scoring of raw interaction logs with a registered model.

Ray Data streams the input: `read_parquet` -> `map_batches` on a pool of actors that each
load the MLflow model once -> `write_parquet`, one score column per task plus the
passthrough columns the user names. Blocks flow through without the whole input ever being
in memory. The input's schema is checked from the Parquet footers, and the output folder
for emptiness, before any work starts: when either is wrong nothing is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlflow
import pandas as pd
import pyarrow.fs as pafs
import ray

from pipeline.config import DataConfig
from pipeline.data.files import InputFiles, filesystem_for, resolve_files
from pipeline.data.validate import check_schema
from pipeline.errors import InputError
from pipeline.runtime import init_ray
from pipeline.serving.scoring import load_scoring_model, read_spec


@dataclass
class ModelSpec:
    """What a logged scoring model expects: its data config and its tasks."""

    data: DataConfig
    tasks: list[str]


def load_spec(model_uri: str) -> ModelSpec:
    """Read the model's spec (features, tasks) without loading the network."""
    try:
        spec = read_spec(model_uri)
    except Exception as err:
        raise InputError(f"--model {model_uri}: cannot read the model ({err})") from None
    data = DataConfig.model_validate(spec["preprocessor"]["data"])
    return ModelSpec(data=data, tasks=[name for name, _ in spec["tasks"]])


class _Scorer:
    """A Ray Data actor: loads the pyfunc model once, then scores pandas batches."""

    def __init__(
        self, model_uri: str, tracking_uri: str, features: list[str], passthrough: list[str]
    ) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mlflow.set_tracking_uri(tracking_uri)
        self.model = load_scoring_model(model_uri)
        self.features = features
        self.passthrough = passthrough

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        scores = self.model.predict(batch[self.features]).reset_index(drop=True)
        kept = batch[self.passthrough].reset_index(drop=True)
        return pd.concat([kept, scores], axis=1)


def _check_output(output_path: str) -> None:
    """Refuse an output that exists as a file or a non-empty folder (any filesystem)."""
    fs, path = filesystem_for(output_path)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise InputError(f"--output {output_path}: is a file; give a folder")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(path)):
        raise InputError(f"--output {output_path}: folder is not empty; choose a new one")


def _gpus(use_gpu: bool | None, actors: int) -> int:
    """GPUs per actor: `use_gpu` None means one each when the cluster has enough."""
    available = ray.cluster_resources().get("GPU", 0)
    if use_gpu is None:
        return 1 if available >= actors else 0
    if use_gpu and available < actors:
        raise InputError(
            f"--gpu: {actors} actor(s) need as many GPUs; the cluster has {available:g}"
        )
    return 1 if use_gpu else 0


def predict(
    model_uri: str,
    input_path: str | list[str],
    output_path: str,
    tracking_uri: str,
    passthrough: list[str] | None = None,
    batch_size: int = 4096,
    actors: int = 1,
    use_gpu: bool | None = None,
) -> int:
    """Score every row of `input_path` with `model_uri` into Parquet under `output_path`.

    Args:
        model_uri: e.g. `models:/adatt@champion`, `models:/adatt/3` or `runs:/RUN/model`.
        input_path: Parquet logs (folder, glob, file or URI; a list of them); only the
            model's feature columns and `passthrough` are read, labels are not needed.
        output_path: a new or empty folder (local or URI) for the scored Parquet files.
        tracking_uri: the MLflow server holding the model.
        passthrough: input columns copied to the output beside the scores (e.g. ids).
        batch_size: rows per scoring call.
        actors: scoring actors; each loads the model once.
        use_gpu: one GPU per actor; None: when the Ray cluster has one per actor.

    Returns:
        The number of rows written: one per input row.

    Raises:
        InputError: before any work, when the model cannot be read, an input column is
            missing or mistyped (naming the file and column), or the output is not empty.

    Example:
        >>> predict("models:/adatt@champion", "logs/", "scores/", uri, ["event_id"])  # doctest: +SKIP
        6000
    """
    mlflow.set_tracking_uri(tracking_uri)
    spec = load_spec(model_uri)
    passthrough = list(dict.fromkeys(passthrough or []))
    clash = sorted(set(passthrough) & set(spec.tasks))
    if clash:
        raise InputError(f"--passthrough {clash}: names clash with the model's score columns")
    _check_output(output_path)
    check = spec.data.model_copy(update={"path": input_path, "passthrough": passthrough})
    files = check_schema(check, labels=False)
    columns = check.columns(labels=False, passthrough=True)

    init_ray()
    gpus = _gpus(use_gpu, actors)
    # select_columns is pushed down into the Parquet read: only these columns are read.
    scored = (
        ray.data.read_parquet(files.paths)
        .select_columns(columns)
        .map_batches(
            _Scorer,
            fn_constructor_args=(model_uri, tracking_uri, spec.data.feature_columns, passthrough),
            batch_size=batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus,
        )
    )
    scored.write_parquet(output_path)
    written = InputFiles.read(resolve_files(output_path)).rows
    if written != files.rows:
        raise RuntimeError(f"{output_path}: wrote {written} rows for {files.rows} input rows")
    return written
