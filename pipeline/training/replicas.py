"""How the workers hold the model: the strategy the loop (`pipeline.training.loop`) calls.

Two strategies share one protocol, `Replicas`:

- `Replicated` (`model.embeddings: dense`): every parameter on every worker, gradients
  all-reduced by DDP; rank 0 writes one `checkpoint.pt`.
- `pipeline.training.sharding.Sharded` (`model.embeddings: torchrec`): the id tables
  sharded over the workers by TorchRec, the rest under DDP; every worker writes its shards.

`make_replicas` picks one from the config.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any, Protocol

import ray.train
import ray.train.torch
import torch
from torch import nn

from pipeline.config import Config, TrainConfig
from pipeline.data.preprocess import Preprocessor
from pipeline.training.checkpoint import TrainingState, save_checkpoint
from pipeline.training.losses import TrainingModel
from pipeline.training.optim import base_rates, embedding_tables, make_optimizer
from pipeline.training.reporting import nbytes, report
from pipeline.training.sharding import Sharded


class Replicas(Protocol):
    """The loop's view of the training module on this worker.

    Attributes:
        module: the (wrapped) training module a step runs.
        optimizer: its optimizer (`param_groups`, `step`, `zero_grad`, `state_dict`).
        base_lrs: each parameter group's configured rate (before any schedule).
        network: the bare network, for evaluation.
    """

    module: nn.Module
    optimizer: Any
    base_lrs: list[float]
    network: nn.Module

    def train_batches(self, batches: Iterator[Any], batch_size: int) -> Iterator[Any]:
        """The epoch's batches as the steps take them (`WorkerFeed.train`'s)."""

    def eval_batches(self, batches: Iterator[Any], batch_size: int) -> Iterator[Any]:
        """Evaluation batches as the evaluation takes them (`WorkerFeed.evaluation`'s)."""

    def table_bytes(self) -> int:
        """What the id tables hold on this worker: weights and optimizer state."""

    def validated(self, improved: bool) -> None:
        """Keep the weights now as the best ones when `improved` (after a validation)."""

    def select_best(self, state: TrainingState) -> None:
        """Load the best weights into the network."""

    def report(self, state: TrainingState, metrics: dict[str, float]) -> None:
        """Write the checkpoint of the weights now and report `metrics` with it (every
        worker calls this)."""


def _unwrap(module: nn.Module) -> TrainingModel:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class Replicated:
    """Every parameter on every worker, gradients all-reduced by DDP (`embeddings: dense`).

    Args:
        training_model: the network and its loss.
        train: the `train:` config section.
        state: the checkpoint to continue from, or None.
        initial: without `state`, the network's weights to start from (a warm start).
    """

    def __init__(
        self,
        training_model: TrainingModel,
        train: TrainConfig,
        state: TrainingState | None,
        initial: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if state is not None:
            training_model.model.load_state_dict(state.model)
            training_model.loss.load_state_dict(state.loss)
        elif initial is not None:  # warm start: the network only; a fresh optimizer
            training_model.model.load_state_dict(initial)
        self.module = ray.train.torch.prepare_model(training_model)
        tables = embedding_tables(self.module)
        self.optimizer = make_optimizer(self.module.parameters(), train, tables)
        # The config's rates, before a restored state's scaled ones replace them.
        self.base_lrs = base_rates(self.optimizer)
        if state is not None:
            self.optimizer.load_state_dict(state.optimizer)
        self.network = _unwrap(self.module).model
        self.best = state.best_model if state is not None else None
        if state is not None and self.best is None and state.best_is_current():
            self.best = state.model

    def train_batches(self, batches: Iterator[Any], batch_size: int) -> Iterator[Any]:
        return batches

    def eval_batches(self, batches: Iterator[Any], batch_size: int) -> Iterator[Any]:
        return batches

    def table_bytes(self) -> int:
        state = self.optimizer.state
        return sum(
            nbytes(t) + sum(nbytes(v) for v in state.get(t, {}).values() if torch.is_tensor(v))
            for t in embedding_tables(self.network)
        )

    def validated(self, improved: bool) -> None:
        if improved:
            self.best = _cpu_state(self.network)

    def select_best(self, state: TrainingState) -> None:
        if self.best is not None:
            self.network.load_state_dict(self.best)

    def report(self, state: TrainingState, metrics: dict[str, float]) -> None:
        state.model = _cpu_state(self.network)
        state.best_model = None if state.best_is_current() else self.best
        state.loss = _cpu_state(_unwrap(self.module).loss)
        state.optimizer = self.optimizer.state_dict()
        if ray.train.get_context().get_world_rank() != 0:
            report(metrics, None)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(state, folder)
            report(metrics, folder)


def make_replicas(
    training_model: TrainingModel,
    config: Config,
    device: torch.device,
    preprocessor: dict[str, Any],
    restored: TrainingState | None,
    folder: str | None,
    initial: dict[str, torch.Tensor] | None,
) -> Replicas:
    """The strategy `config.model.embeddings` asks for, restored from `restored` (read from
    `folder`) or started from `initial` weights (a warm start) or from scratch."""
    fitted = Preprocessor.from_dict(preprocessor)
    if config.model.embeddings != "torchrec":
        return Replicated(training_model, config.train, restored, initial)
    return Sharded(training_model, config.train, device, fitted, restored, folder, initial=initial)
