"""Training checkpoints: one `checkpoint.pt` per Ray Train checkpoint directory.

The file is a plain dict of tensors and JSON-like values, so it loads with
`torch.load(weights_only=True)`: no pickled classes, nothing executed on load. It stores the
config and the preprocessing statistics with the weights, so a resume or a scoring job
rebuilds the exact model (the nanoGPT habit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import InputError

FILENAME = "checkpoint.pt"


@dataclass
class TrainingState:
    """Everything a resumed run needs.

    Args:
        model: the network's state dict.
        loss: the loss module's state dict (learned task weights).
        optimizer: the optimiser's state dict.
        epoch: the last completed epoch (1-based); training resumes at epoch + 1.
        history: one metrics dict per completed epoch.
        best_epoch / best_value: the best epoch so far on the early-stopping metric.
        best_model: the network's state at best_epoch, when that is not `epoch`.
        config: the resolved config (`Config.model_dump(mode="json")`).
        preprocessor: the fitted preprocessing statistics.
        mlflow_run_id: the MLflow run this training logs to.
        final: True for the last checkpoint, whose `model` is the selected (best) model.
        restarts: how often training restarted from a checkpoint (worker failure, resume).
        sharded: the tables are sharded (`model.embeddings: torchrec`): `model`, `loss` and
            `best_model` are empty here, and every worker's shards are in the checkpoint
            folder's `sharded/` (see `pipeline.training.sharding`).
        step_in_epoch: steps taken in epoch `epoch + 1` when the checkpoint was written
            inside it (0 at an epoch's end): where every worker's data stands
            (`pipeline.data.plan`: the same position on every worker).
        global_step: steps since the run started (the MLflow step of every report).
        validations: validation passes reported (Tune's time axis).
        best_step: the global step of the best validation so far.
        workers: per rank, what the step-level state of the epoch in progress needs: the
            epoch's running sums (`tally`) and the RNG states (`rng`, `cuda_rng`).
        best_metrics: the validation metrics of the best validation so far.
    """

    model: dict[str, torch.Tensor]
    loss: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    epoch: int
    config: dict[str, Any]
    preprocessor: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_value: float | None = None
    best_model: dict[str, torch.Tensor] | None = None
    mlflow_run_id: str | None = None
    final: bool = False
    restarts: int = 0
    sharded: bool = False
    step_in_epoch: int = 0
    global_step: int = 0
    validations: int = 0
    best_step: int | None = None
    workers: list[dict[str, Any]] = field(default_factory=list)
    best_metrics: dict[str, float] = field(default_factory=dict)

    def best_is_current(self) -> bool:
        """Whether the best weights are the ones now: the best validation was the last
        thing before this point, with no step since (checkpoints of earlier versions, which
        validated at epoch ends only: by epoch)."""
        if self.final:
            return True
        if self.best_step is not None:
            return self.best_step == self.global_step
        return self.best_epoch == self.epoch > 0 and not self.step_in_epoch


def save_checkpoint(state: TrainingState, folder: str | Path) -> Path:
    """Write `state` into `folder/checkpoint.pt` and return the file's path."""
    path = Path(folder) / FILENAME
    torch.save(dict(state.__dict__), path)
    return path


def load_checkpoint(path: str | Path) -> TrainingState:
    """Read a checkpoint file or a checkpoint folder (weights only, no code executed)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise InputError(f"{path}: no checkpoint file here")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which
        raise InputError(f"{path}: not a readable checkpoint ({err})") from None
    return TrainingState(**raw)
