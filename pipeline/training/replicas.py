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
from pipeline.data.ingest import batch_layout, iter_batches
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

    def train_batches(self, shard: Any, batch_size: int, device: torch.device, seed: int) -> Any:
        """The epoch's shuffled training batches; `seed` seeds the shuffle."""

    def eval_batches(self, shard: Any, batch_size: int, device: torch.device) -> Iterator[Any]:
        """Evaluation batches, in order."""

    def table_bytes(self) -> int:
        """What the id tables hold on this worker: weights and optimizer state."""

    def end_epoch(self, improved: bool) -> None:
        """Keep the epoch's weights as the best ones when `improved`."""

    def select_best(self) -> None:
        """Load the best epoch's weights into the network."""

    def report(self, state: TrainingState, metrics: dict[str, float]) -> None:
        """Write the checkpoint and report `metrics` with it (every worker calls this)."""


def _unwrap(module: nn.Module) -> TrainingModel:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class Replicated:
    """Every parameter on every worker, gradients all-reduced by DDP (`embeddings: dense`).

    Args:
        training_model: the network and its loss.
        train: the `train:` config section.
        preprocessor: the run's preprocessing (the batches' layout).
        state: the checkpoint to continue from, or None.
        initial: without `state`, the network's weights to start from (a warm start).
    """

    def __init__(
        self,
        training_model: TrainingModel,
        train: TrainConfig,
        preprocessor: Preprocessor,
        state: TrainingState | None,
        initial: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.layout = batch_layout(preprocessor)
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
        self.current = state.model if state is not None else None
        self.best = state.best_model if state is not None else None
        if state is not None and self.best is None and state.best_epoch == state.epoch > 0:
            self.best = state.model

    def train_batches(self, shard: Any, batch_size: int, device: torch.device, seed: int) -> Any:
        return iter_batches(shard, self.layout, batch_size, device, shuffle=True, seed=seed)

    def eval_batches(self, shard: Any, batch_size: int, device: torch.device) -> Iterator[Any]:
        return iter_batches(shard, self.layout, batch_size, device)

    def table_bytes(self) -> int:
        state = self.optimizer.state
        return sum(
            nbytes(t) + sum(nbytes(v) for v in state.get(t, {}).values() if torch.is_tensor(v))
            for t in embedding_tables(self.network)
        )

    def end_epoch(self, improved: bool) -> None:
        self.current = _cpu_state(self.network)
        if improved:
            self.best = self.current

    def select_best(self) -> None:
        if self.best is not None:
            self.network.load_state_dict(self.best)
        self.current = self.best = _cpu_state(self.network)

    def report(self, state: TrainingState, metrics: dict[str, float]) -> None:
        state.model = self.current
        state.best_model = None if self.best is self.current else self.best
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
        return Replicated(training_model, config.train, fitted, restored, initial)
    return Sharded(training_model, config.train, device, fitted, restored, folder, initial=initial)
