"""`--resume`: find the run and the checkpoint a training continues from, on local disk or
object storage.

A resumed run is the same MLflow run; its Ray Train part starts under a new Ray run name
(`<name>-r<n>` beside the run's `<name>` in the same storage; the run's
`adatt.ray_run_name` tag keeps `<name>`) from the checkpoint chosen here, passed to the
workers explicitly. Ray Train would otherwise restore the newest checkpoint it recorded,
whatever its state: here the newest checkpoint that reads back is taken, and a corrupt or
truncated newer one is skipped with a one-line warning naming it.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch

from pipeline.data.files import exists, filesystem_for, join
from pipeline.errors import InputError
from pipeline.tracking import tags
from pipeline.training.checkpoint import FILENAME as CHECKPOINT_FILE
from pipeline.training.checkpoint import TrainingState, load_checkpoint


@dataclass(frozen=True)
class Resumed:
    """What a resumed training continues: its MLflow run, the checkpoint (a folder path or
    URI) and its state, and the Ray Train run name of the new segment."""

    run_id: str
    checkpoint: str
    state: TrainingState
    ray_name: str


def checkpoint_folders(storage: str, name: str) -> list[str]:
    """The `checkpoint_*` folders of Ray Train run `name` and of its resumed segments
    (`name-r1`, `name-r2`, ...) under `storage`, newest first (Ray names them by time)."""
    fs, root = filesystem_for(storage)
    found = []
    for run in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        base = run.base_name
        if run.type != pafs.FileType.Directory or not (
            base == name or base.startswith(f"{name}-r")
        ):
            continue
        for item in fs.get_file_info(pafs.FileSelector(run.path, allow_not_found=True)):
            if item.type == pafs.FileType.Directory and item.base_name.startswith("checkpoint_"):
                found.append((item.base_name, join(storage, base, item.base_name)))
    return [path for _, path in sorted(found, reverse=True)]


def read_state(folder: str) -> TrainingState:
    """The `checkpoint.pt` of a checkpoint folder (path or URI); InputError if unreadable."""
    if "://" not in folder:
        return load_checkpoint(folder)
    fs, path = filesystem_for(join(folder, CHECKPOINT_FILE))
    try:
        with fs.open_input_stream(path) as stream:
            raw = torch.load(io.BytesIO(stream.read()), map_location="cpu", weights_only=True)
    except Exception as err:  # a missing, truncated or foreign file: say which
        raise InputError(f"{folder}/{CHECKPOINT_FILE}: not a readable checkpoint ({err})") from None
    return TrainingState(**raw)


def newest_usable(storage: str, name: str) -> tuple[str, TrainingState] | None:
    """The newest checkpoint that reads back; each newer one that does not is skipped with a
    warning naming it."""
    for folder in checkpoint_folders(storage, name):
        try:
            return folder, read_state(folder)
        except InputError as err:
            print(f"warning: skipping checkpoint {folder}: {err}", file=sys.stderr, flush=True)
    return None


def next_segment(storage: str, name: str) -> str:
    """The Ray Train run name of the next resumed segment of run `name`."""
    fs, root = filesystem_for(storage)
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))}
    n = 1
    while f"{name}-r{n}" in names:
        n += 1
    return f"{name}-r{n}"


def resolve_resume(resume: str, client: Any) -> Resumed:
    """`--resume` is a checkpoint folder (path or URI) or an MLflow run id."""
    if exists(resume):
        state = read_state(resume)
        if not state.mlflow_run_id:
            raise InputError(f"{resume}: checkpoint has no MLflow run id to resume into")
        run = client.get_run(state.mlflow_run_id)
        name = run.data.tags.get(tags.RAY_RUN, f"adatt-{state.mlflow_run_id}")
        storage = run.data.tags.get(tags.STORAGE, resume.rsplit("/", 2)[0])
        return Resumed(state.mlflow_run_id, resume, state, next_segment(storage, name))
    try:
        run = client.get_run(resume)
    except Exception:
        raise InputError(
            f"--resume {resume}: neither a checkpoint path nor an MLflow run id"
        ) from None
    if run.info.status == "FINISHED":
        raise InputError(f"--resume {resume}: the run already FINISHED; nothing to resume")
    if tags.RAY_RUN not in run.data.tags or tags.STORAGE not in run.data.tags:
        raise InputError(f"--resume {resume}: not a run started by `adatt train`")
    if run.info.status == "RUNNING":
        # What a SIGKILL'd driver leaves behind; a live driver would make this a mistake.
        print(
            f"resuming run {resume}, marked RUNNING: its driver must have died",
            file=sys.stderr,
        )
    storage, name = run.data.tags[tags.STORAGE], run.data.tags[tags.RAY_RUN]
    found = newest_usable(storage, name)
    if found is None:
        raise InputError(f"--resume {resume}: no readable checkpoint under {join(storage, name)}")
    folder, state = found
    return Resumed(resume, folder, state, next_segment(storage, name))
