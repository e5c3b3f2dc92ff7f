"""The Ray Train worker loop: one plain function of a config dict (the Ray Train examples'
pattern), the same for a single run, a Tune trial and a cluster job.

Per epoch: train on this worker's shard, evaluate on the validation shard (metrics exact
across workers), report metrics with a checkpoint from rank 0. After the last epoch, the
best epoch's model is evaluated on the test split (when there is one) and reported as the
final checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from models import build_model
from pipeline.config import Config, TrainConfig, parse_config
from pipeline.data.ingest import iter_batches
from pipeline.data.preprocess import Preprocessor
from pipeline.training.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from pipeline.training.faults import fault_trigger
from pipeline.training.losses import MultiTaskLoss, TrainingModel
from pipeline.training.metrics import MultiTaskMetrics, TaskKind


def make_optimizer(module: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over every trainable parameter (network and learned loss weights).

    With `train.embedding_lr`, the embedding tables form a second parameter group with
    that learning rate (group 0: the rest at `train.lr`, group 1: embeddings).
    """
    cls = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    tables = [m.weight for m in module.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)]
    if train.embedding_lr is None or not tables:
        return cls(module.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    table_ids = {id(p) for p in tables}
    rest = [p for p in module.parameters() if id(p) not in table_ids]
    groups = [{"params": rest}, {"params": tables, "lr": train.embedding_lr}]
    return cls(groups, lr=train.lr, weight_decay=train.weight_decay)


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The multiplier of the base learning rates in `epoch` (1-based) of `epochs`."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - 0.5) / epochs))
    return 1.0


def set_epoch_lr(
    optimizer: torch.optim.Optimizer, base_lrs: list[float], train: TrainConfig, epoch: int
) -> float:
    """Set each group's rate for `epoch` to its base rate times `lr_factor`; returns group 0's.

    The base rates come from the config (`make_optimizer`), not from a restored optimiser
    state, whose rates are the last epoch's scaled ones.
    """
    factor = lr_factor(train.lr_schedule, epoch, train.epochs)
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * factor
    return optimizer.param_groups[0]["lr"]


def build_training_model(config: Config) -> TrainingModel:
    """The network plus its multi-task loss, as configured."""
    model = build_model(config.model, config.data.feature_schema())
    loss = MultiTaskLoss(
        [t.type for t in config.data.tasks],
        [t.weight for t in config.data.tasks],
        config.train.loss_weighting,
    )
    return TrainingModel(model, loss)


def train_autocast(device: torch.device, train: TrainConfig) -> Any:
    """The context of a training step: bf16 autocast on a GPU when `train.bf16`, else none.

    Only training steps run under it; evaluation runs in float32, so validation and test
    metrics are those of the float32 model that `adatt predict` scores with.
    """
    if device.type == "cuda" and train.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def train_epoch(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches_in: Iterator[dict[str, Any]],
    config: Config,
    device: torch.device,
    *,
    before_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """One pass over this worker's training batches; returns global loss and samples/s.

    Args:
        batches_in: the epoch's batches (`Replicated.train_batches`); a padded batch holds
            its number of real rows as `rows` (`sharding.lockstep`).
        before_step: called with the number of steps done before each step (fault hook).
    """
    module.train()
    num_tasks = len(config.data.tasks)
    loss_sum, rows, batches = 0.0, 0, 0
    task_loss_sum = torch.zeros(num_tasks, dtype=torch.float64)
    # DDP's join() lets workers whose shard ends one batch early drop out without a hang.
    join = (
        module.join() if isinstance(module, nn.parallel.DistributedDataParallel) else nullcontext()
    )
    start = time.perf_counter()
    with join:
        for batch in batches_in:
            if before_step is not None:
                before_step(batches)
            with train_autocast(device, config.train):
                total, per_task, _ = module(batch)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            n = int(batch["rows"]) if "rows" in batch else batch["labels"].shape[0]
            loss_sum += float(total.detach()) * n
            task_loss_sum += per_task.double().cpu() * n
            rows += n
            batches += 1
    elapsed = time.perf_counter() - start
    loss_sum, rows, elapsed_sum = _all_reduce_sum([loss_sum, rows, elapsed], device)
    out = {
        "train/loss": loss_sum / max(rows, 1),
        "train/rows": rows,
        "train/steps_per_worker": batches,
        "train/seconds": elapsed_sum / ray.train.get_context().get_world_size(),
        # elapsed is summed over workers: divided by the world size it is the mean wall time.
        "train/samples_per_s": rows
        / max(elapsed_sum / ray.train.get_context().get_world_size(), 1e-9),
    }
    totals = _all_reduce_sum(task_loss_sum.tolist(), device)
    for task, value in zip(config.data.tasks, totals, strict=True):
        out[f"train/{task.name}/loss"] = value / max(rows, 1)
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterator[dict[str, Any]],
    config: Config,
    device: torch.device,
    prefix: str,
) -> dict[str, float]:
    """Metrics over `batches` of every worker (every worker must call this)."""
    model.eval()
    data = config.data
    kinds = [TaskKind(t.name, t.type, data.group_column_of(t)) for t in data.tasks]
    metrics = MultiTaskMetrics(kinds, device)
    for batch in batches:
        groups = {c: batch[f"group.{c}"] for c in data.group_columns}
        metrics.update(model(batch), batch["labels"], batch["mask"], groups)
    return metrics.compute(prefix)


def _improved(value: float, best: float | None, mode: str) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def _unwrap(module: nn.Module) -> TrainingModel:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def report(metrics: dict[str, float], folder: str | None) -> None:
    """`ray.train.report` from this worker, with the checkpoint folder it wrote (if any).
    Every worker reports (a barrier); Ray Train merges the workers' folders into one."""
    checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
    ray.train.report(metrics, checkpoint=checkpoint)


class Replicated:
    """Every parameter on every worker, gradients all-reduced by DDP (`embeddings: dense`).

    The loop's view of the training module, shared with `sharding.Sharded`: the module and
    its optimizer, the network, evaluation batches, the best epoch's weights, checkpoints
    (one `checkpoint.pt`, written by rank 0).
    """

    def __init__(
        self,
        training_model: TrainingModel,
        train: TrainConfig,
        state: Any,
        initial: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if state is not None:
            training_model.model.load_state_dict(state.model)
            training_model.loss.load_state_dict(state.loss)
        elif initial is not None:  # warm start: the network only; a fresh optimizer
            training_model.model.load_state_dict(initial)
        self.module = ray.train.torch.prepare_model(training_model)
        self.optimizer = make_optimizer(self.module, train)
        # The config's rates, before a restored state's scaled ones replace them.
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        if state is not None:
            self.optimizer.load_state_dict(state.optimizer)
        self.network = _unwrap(self.module).model
        self.current = state.model if state is not None else None
        self.best = state.best_model if state is not None else None
        if state is not None and self.best is None and state.best_epoch == state.epoch > 0:
            self.best = state.model

    def train_batches(self, shard: Any, batch_size: int, device: torch.device, seed: int) -> Any:
        """The epoch's shuffled batches; `seed` seeds the shuffle (see `epoch_seed`)."""
        return iter_batches(shard, batch_size, device, shuffle=True, seed=seed)

    def eval_batches(self, shard: Any, batch_size: int, device: torch.device) -> Iterator[Any]:
        return iter_batches(shard, batch_size, device, shuffle=False)

    def table_bytes(self) -> int:
        """What the id tables hold on this worker: their weights and optimizer state."""
        tables = [
            m.weight
            for m in self.network.modules()
            if isinstance(m, nn.Embedding | nn.EmbeddingBag)
        ]
        state = self.optimizer.state
        return sum(
            _nbytes(t) + sum(_nbytes(v) for v in state.get(t, {}).values() if torch.is_tensor(v))
            for t in tables
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


@contextlib.contextmanager
def _restored_folder(loop_config: dict[str, Any]) -> Iterator[str | None]:
    """The checkpoint folder to continue from, on this worker, while inside; or None."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restart after a failure, or a resumed Ray run
        with checkpoint.as_directory() as folder:
            yield folder
    else:
        yield loop_config.get("resume_from")


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one worker's epoch: torch's RNG and the shuffle buffer restart from it, so
    an epoch re-run after a failure or a `--resume` repeats the uninterrupted run's epoch."""
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2**31


def quiet_worker_logging() -> None:
    """Keep the INFO lines of the libraries a worker runs off the console: warnings only.

    Ray Train sets a worker's root logger to INFO, and two libraries log through it at every
    report or model build, several KB a worker each time, above the one-line epoch summary
    (`EpochLogger`): Ray Train 2.60's `TrainingReport(checkpoint=..., metrics={...})` of
    every `ray.train.report` (from a logger named by its file's path, outside `ray.train`,
    so the run's `ray.train.LoggingConfig` does not reach it), and FBGEMM's argument dump of
    every sharded table group. Ray Train's own `ray.train` logger keeps its level.
    """
    logging.getLogger().setLevel(logging.WARNING)


def peak_memory_bytes() -> int:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. `loop_config` holds `config` (the Config as a JSON dict),
    `preprocessor` (fitted statistics), `mlflow_run_id`, and optionally `resume_from` and
    `warm_start` (an object ref of the network's initial state dict)."""
    quiet_worker_logging()
    config = parse_config(loop_config["config"], source="train_loop_config")
    torch.manual_seed(config.train.seed)
    device = ray.train.torch.get_device()
    if device.type == "cpu" and config.train.threads_per_worker:
        torch.set_num_threads(config.train.threads_per_worker)
    with _restored_folder(loop_config) as folder:
        restored = load_checkpoint(folder) if folder else None
        # A warm start initialises the network of a new run; a restart or resume continues
        # from the run's own checkpoint instead.
        initial = loop_config.get("warm_start") if restored is None else None
        initial = ray.get(initial) if initial is not None else None
        training_model = build_training_model(config)
        if config.model.embeddings == "torchrec":
            from pipeline.training.sharding import Sharded

            empty = Preprocessor.from_dict(loop_config["preprocessor"]).empty()
            replicas = Sharded(
                training_model, config.train, device, empty, restored, folder, initial=initial
            )
        else:
            replicas = Replicated(training_model, config.train, restored, initial)
    state = restored or TrainingState(
        model={},
        loss={},
        optimizer={},
        epoch=0,
        config=loop_config["config"],
        preprocessor=loop_config["preprocessor"],
        mlflow_run_id=loop_config.get("mlflow_run_id"),
    )
    if restored is not None:
        # Counted in the checkpoint, so a restart shows in the next epochs' metrics.
        state.restarts += 1
    state.sharded = config.model.embeddings == "torchrec"
    stopping = config.train.early_stopping
    eval_rows = config.data.batch_size * 4

    rank = ray.train.get_context().get_world_rank()
    for epoch in range(state.epoch + 1, config.train.epochs + 1):
        if state.final:
            break
        seed = epoch_seed(config.train.seed, epoch, rank)
        torch.manual_seed(seed)
        previous_steps = state.history[-1]["train/steps_per_worker"] if state.history else None
        lr = set_epoch_lr(replicas.optimizer, replicas.base_lrs, config.train, epoch)
        metrics = {
            "epoch": epoch,
            "train/lr": lr,
            **train_epoch(
                replicas.module,
                replicas.optimizer,
                replicas.train_batches(
                    ray.train.get_dataset_shard("train"), config.data.batch_size, device, seed
                ),
                config,
                device,
                before_step=fault_trigger(epoch, rank, restored is not None, previous_steps),
            ),
            "train/restarts": state.restarts,
        }
        started = time.perf_counter()
        validation = ray.train.get_dataset_shard("validation")
        batches = replicas.eval_batches(validation, eval_rows, device)
        metrics.update(evaluate(replicas.network, batches, config, device, "val"))
        metrics["val/seconds"] = time.perf_counter() - started
        peak, tables = _all_reduce_max([peak_memory_bytes(), replicas.table_bytes()], device)
        metrics["train/peak_memory_mb_per_worker"] = peak / 2**20
        metrics["train/table_mb_per_worker"] = tables / 2**20
        value = metrics.get(stopping.metric, float("nan"))
        improved = _improved(value, state.best_value, stopping.mode)
        if improved:
            state.best_epoch, state.best_value = epoch, value
        replicas.end_epoch(improved)
        state.epoch = epoch
        state.history.append(metrics)
        replicas.report(state, metrics)
        if stopping.patience and epoch - state.best_epoch >= stopping.patience:
            break

    if state.final:
        return
    # Final: the selected model, evaluated on the test split when there is one.
    replicas.select_best()
    final = {"final": 1, "epoch": state.epoch, "best_epoch": state.best_epoch}
    best_metrics = next((h for h in state.history if h["epoch"] == state.best_epoch), {})
    final.update({f"best/{k}": v for k, v in best_metrics.items() if k.startswith("val/")})
    test_shard = _test_shard()
    if test_shard is not None:
        batches = replicas.eval_batches(test_shard, eval_rows, device)
        final.update(evaluate(replicas.network, batches, config, device, "test"))
    state.final = True
    replicas.report(state, copy.deepcopy(final))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.tolist()


def _test_shard() -> Any:
    try:
        return ray.train.get_dataset_shard("test")
    except (KeyError, ValueError):
        return None
