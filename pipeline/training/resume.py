"""`--resume`: find the run and the checkpoint a training continues from."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.tracking import tags
from pipeline.training.checkpoint import FILENAME as CHECKPOINT_FILE
from pipeline.training.checkpoint import TrainingState, load_checkpoint


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest `checkpoint_*` folder of a Ray Train run folder that holds a checkpoint
    file, if any (a driver killed while a checkpoint was copied can leave an empty one)."""
    found = sorted(
        (p for p in folder.glob("checkpoint_*") if (p / CHECKPOINT_FILE).is_file()),
        key=lambda p: p.stat().st_mtime,
    )
    return found[-1] if found else None


def resolve_resume(resume: str, client: Any) -> tuple[str, TrainingState, str]:
    """`--resume` is a checkpoint path or an MLflow run id; return (run id, state, ray name)."""
    path = Path(resume)
    if path.exists():
        state = load_checkpoint(path)
        if not state.mlflow_run_id:
            raise InputError(f"{path}: checkpoint has no MLflow run id to resume into")
        run = client.get_run(state.mlflow_run_id)
        return state.mlflow_run_id, state, run.data.tags.get(tags.RAY_RUN, state.mlflow_run_id)
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
    name = run.data.tags[tags.RAY_RUN]
    folder = Path(run.data.tags[tags.STORAGE]) / name
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        raise InputError(f"--resume {resume}: no checkpoint under {folder}")
    return resume, load_checkpoint(checkpoint), name
