"""`adatt predict`: batch scoring of raw interaction logs with a registered model.

The model URI is resolved once, to a pinned version, and the model is read once on the
driver (as data: spec and weights) and shared with the scoring actors through Ray's object
store, so a promotion in the middle of a job cannot mix two versions in one output. Ray
Data streams the input: `read_parquet` -> `map_batches` on a pool of actors that each build
the model once -> `write_parquet`, one score column per task plus the passthrough columns
the user names. The input's schema is checked from the Parquet footers, and the output
folder for emptiness, before any work starts: when either is wrong nothing is written.

The output is written under `<output>/_temporary/<id>/` (a name readers skip), then moved
into `<output>` and marked `_SUCCESS` (JSON: the pinned model, its rows, the input files,
the output files). A failed run leaves no marker and no files at the final path.
"""

from __future__ import annotations

import pandas as pd
import pyarrow.fs as pafs
import ray

from pipeline.data.files import (
    InputFiles,
    commit,
    discard,
    filesystem_for,
    resolve_files,
    staging_folder,
)
from pipeline.data.ingest import DATA_TASK_CPUS, naming_corrupt_files, read_files
from pipeline.data.validate import check_schema
from pipeline.errors import InputError
from pipeline.modelfile.format import ModelData
from pipeline.modelfile.store import read_model, resolve_model
from pipeline.serving.scoring import ScoringModel
from pipeline.session import Session


class _Scorer:
    """A Ray Data actor: builds the model once, then scores pandas batches."""

    def __init__(self, model: ModelData, passthrough: list[str]) -> None:
        self.model = ScoringModel(model)
        self.features = model.data.feature_columns
        self.passthrough = passthrough

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        scores = self.model.predict(batch[self.features]).reset_index(drop=True)
        kept = batch[self.passthrough].reset_index(drop=True)
        return pd.concat([kept, scores], axis=1)


def check_output_free(output_path: str, flag: str = "--output") -> None:
    """Refuse an output that exists as a file or a non-empty folder (any filesystem)."""
    fs, path = filesystem_for(output_path)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise InputError(f"{flag} {output_path}: is a file; give a folder")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(path)):
        raise InputError(f"{flag} {output_path}: folder is not empty; choose a new one")


def actor_gpus(use_gpu: bool | None, actors: int) -> int:
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
    session: Session,
    model_uri: str,
    input_path: str | list[str],
    output_path: str,
    passthrough: list[str] | None = None,
    batch_size: int = 4096,
    actors: int = 1,
    use_gpu: bool | None = None,
) -> int:
    """Score every row of `input_path` with `model_uri` into Parquet under `output_path`.

    Args:
        session: the command's session (its client reads the model).
        model_uri: e.g. `models:/adatt@champion`, `models:/adatt/3` or `runs:/RUN/model`.
        input_path: Parquet logs (folder, glob, file or URI; a list of them); only the
            model's feature columns and `passthrough` are read, labels are not needed.
        output_path: a new or empty folder (local or URI) for the scored Parquet files.
        passthrough: input columns copied to the output beside the scores (e.g. ids).
        batch_size: rows per scoring call.
        actors: scoring actors; each builds the model once.
        use_gpu: one GPU per actor; None: when the Ray cluster has one per actor.

    Returns:
        The number of rows written: one per input row.

    Raises:
        InputError: before any work, when the model cannot be read, an input column is
            missing or mistyped (naming the file and column), or the output is not empty.
    """
    ref = resolve_model(model_uri, session.client)
    model = read_model(ref, session.client)
    passthrough = list(dict.fromkeys(passthrough or []))
    clash = sorted(set(passthrough) & {t.name for t in model.tasks})
    if clash:
        raise InputError(f"--passthrough {clash}: names clash with the model's score columns")
    check_output_free(output_path)
    check = model.data.model_copy(update={"path": input_path, "passthrough": passthrough})
    files = check_schema(check, labels=False)
    session.echo(f"scoring {files.rows:,} rows of {len(files)} file(s) with {ref.uri}")
    session.start_ray()
    columns = check.columns(labels=False, passthrough=True)
    marker = {"model": ref.uri, "given": ref.given, "inputs": files.paths}
    with naming_corrupt_files(files.paths, columns):
        scored = read_files(files.paths, columns).map_batches(
            _Scorer,
            fn_constructor_args=(model, passthrough),
            batch_size=batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=DATA_TASK_CPUS,  # a whole CPU each would leave none to the reads
            num_gpus=actor_gpus(use_gpu, actors),
        )
        return write_committed(scored, output_path, files.rows, marker)


def write_committed(scored: ray.data.Dataset, output: str, rows: int, marker: dict) -> int:
    """Write `scored` under a staging folder of `output`, check its row count, then commit
    it with its `_SUCCESS` marker; a failure leaves nothing at `output`. Rows written."""
    staging = staging_folder(output)
    try:
        scored.write_parquet(staging)
        written = InputFiles.read(resolve_files(staging)).rows
        if written != rows:
            raise RuntimeError(f"{output}: wrote {written} rows for {rows} input rows")
    except BaseException:
        discard(staging)  # nothing at the final path: no files, no marker
        raise
    commit(staging, output, {**marker, "rows": written})
    return written
