"""The Ray Train worker loop: one plain function of a config dict (the Ray Train examples'
pattern), the same for a single run, a Tune trial and a cluster job.

It reads as setup -> epoch x E -> final. Setup restores the run's checkpoint (a restart or
a resume) or starts from scratch or a warm start, under the worker strategy the config
asks for (`replicas.make_replicas`). Each epoch trains on this worker's shard, evaluates
on the validation shard (metrics exact across workers) and reports the metrics with a
checkpoint. After the last epoch, the best epoch's model is evaluated on the test split
(when there is one) and reported as the final checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from pipeline.config import GRADIENT_METHODS, Config, EarlyStopping, TrainConfig, parse_config
from pipeline.metrics_vocab import beats
from pipeline.training.balancing import GradientBalancer
from pipeline.training.checkpoint import TrainingState, load_checkpoint
from pipeline.training.faults import fault_trigger
from pipeline.training.losses import build_training_model
from pipeline.training.metrics import MultiTaskMetrics
from pipeline.training.optim import set_epoch_lr
from pipeline.training.replicas import Replicas, make_replicas
from pipeline.training.reporting import all_reduce, peak_memory_bytes
from pipeline.training.step import TrainStep, resolve_step_mode

EVAL_BATCHES_PER_TRAIN_BATCH = 4  # evaluation batches are this many training batches


class NonFiniteLoss(RuntimeError):
    """An epoch's training loss was NaN or infinite: training stops before that epoch's
    checkpoint, so the last reported (good) one stays the run's newest."""


def make_step(replicas: Replicas, config: Config, device: torch.device) -> TrainStep:
    """This worker's train step over the strategy's module and optimizer, in the configured
    mode (`pipeline.training.step`)."""
    train = config.train
    balancing = train.loss_weighting in GRADIENT_METHODS
    mode = resolve_step_mode(train.step_mode, device, config.model.embeddings, balancing)
    balancer = None
    if balancing:
        weights = [t.weight for t in config.data.tasks]
        balancer = GradientBalancer(train.loss_weighting, replicas.module, weights, train.seed)
    return TrainStep(
        replicas.module,
        replicas.optimizer,
        device,
        mode,
        bf16=train.bf16,
        grad_clip=train.grad_clip,
        rows=config.data.batch_size,
        num_tasks=len(config.data.tasks),
        balancer=balancer,
    )


def train_epoch(
    step: TrainStep,
    batches_in: Iterator[dict[str, Any]],
    config: Config,
    device: torch.device,
    *,
    before_step: Callable[[int, dict], None] | None = None,
) -> dict[str, float]:
    """One pass over this worker's training batches; returns global loss and samples/s.

    Args:
        step: this worker's train step (`make_step`).
        batches_in: the epoch's batches (`Replicas.train_batches`); a padded batch holds
            its number of real rows as `rows` (`sharding.lockstep`).
        before_step: called with the number of steps done and the batch before each step
            (the fault hook).
    """
    module = step.module
    module.train()
    rows, batches = 0, 0
    # DDP's join() lets workers whose shard ends one batch early drop out without a hang.
    ddp = isinstance(module, nn.parallel.DistributedDataParallel)
    start = time.perf_counter()
    with module.join() if ddp and step.mode == "eager" else nullcontext():
        for batch in batches_in:
            if before_step is not None:
                before_step(batches, batch)
            real = int(batch.pop("rows")) if "rows" in batch else batch["labels"].shape[0]
            step(batch, real)
            rows, batches = rows + real, batches + 1
        loss_sum, task_sums = step.sums()  # waits for the last step
    elapsed = time.perf_counter() - start
    loss_sum, rows, elapsed_sum = all_reduce([loss_sum, rows, elapsed], device)
    # elapsed is summed over workers: divided by the world size it is the mean wall time.
    seconds = elapsed_sum / ray.train.get_context().get_world_size()
    out = {
        "train/loss": loss_sum / max(rows, 1),
        "train/rows": rows,
        "train/steps_per_worker": batches,
        "train/seconds": seconds,
        "train/samples_per_s": rows / max(seconds, 1e-9),
    }
    totals = all_reduce(task_sums, device)
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
    metrics = MultiTaskMetrics(data.tasks, device)
    for batch in batches:
        groups = {c: batch[f"group.{c}"] for c in data.group_columns}
        metrics.update(model(batch), batch["labels"], batch["mask"], groups)
    return metrics.compute(prefix)


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


@contextlib.contextmanager
def _restored_folder(loop_config: dict[str, Any]) -> Iterator[str | None]:
    """The checkpoint folder to continue from, on this worker, while inside; or None: the
    run's own newest (a restart after a worker failure), else the one `--resume` chose
    (a path or URI, fetched by Ray)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(loop_config["resume_from"])
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield folder


def _worker_device(train: TrainConfig) -> torch.device:
    device = ray.train.torch.get_device()
    if device.type == "cpu" and train.threads_per_worker:
        torch.set_num_threads(train.threads_per_worker)
    return device


def restore_or_init(
    loop_config: dict[str, Any], config: Config, device: torch.device
) -> tuple[Replicas, TrainingState, bool]:
    """The worker strategy and the run's state: restored from the run's checkpoint (a
    restart or a resume), or new (from scratch, or a warm start's weights); and whether
    it was restored."""
    with _restored_folder(loop_config) as folder:
        restored = load_checkpoint(folder) if folder else None
        # A warm start initialises the network of a new run; a restart or resume continues
        # from the run's own checkpoint instead.
        initial = loop_config.get("warm_start") if restored is None else None
        initial = ray.get(initial) if initial is not None else None
        replicas = make_replicas(
            build_training_model(config),
            config,
            device,
            loop_config["preprocessor"],
            restored,
            folder,
            initial,
        )
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
    return replicas, state, restored is not None


def run_epoch(
    step: TrainStep,
    replicas: Replicas,
    state: TrainingState,
    config: Config,
    device: torch.device,
    epoch: int,
    restored: bool,
) -> dict[str, float]:
    """Train and validate one epoch; update `state` (history, best epoch); its metrics."""
    rank = ray.train.get_context().get_world_rank()
    seed = epoch_seed(config.train.seed, epoch, rank)
    torch.manual_seed(seed)
    previous_steps = state.history[-1]["train/steps_per_worker"] if state.history else None
    batches = replicas.train_batches(
        ray.train.get_dataset_shard("train"), config.data.batch_size, device, seed
    )
    metrics = {
        "epoch": epoch,
        "train/lr": set_epoch_lr(replicas.optimizer, replicas.base_lrs, config.train, epoch),
        **train_epoch(
            step,
            batches,
            config,
            device,
            before_step=fault_trigger(epoch, rank, restored, previous_steps),
        ),
        "train/restarts": state.restarts,
    }
    if not math.isfinite(metrics["train/loss"]):  # the same sum on every worker: all stop
        kept = (
            f"the last good checkpoint is epoch {state.epoch}'s"
            if state.epoch
            else "no epoch finished, so the run has no checkpoint"
        )
        raise NonFiniteLoss(
            f"epoch {epoch}: the training loss is {metrics['train/loss']}; {kept}. "
            "Lower train.lr, or set train.grad_clip"
        )
    started = time.perf_counter()
    eval_rows = config.data.batch_size * EVAL_BATCHES_PER_TRAIN_BATCH
    validation = replicas.eval_batches(ray.train.get_dataset_shard("validation"), eval_rows, device)
    metrics.update(evaluate(replicas.network, validation, config, device, "val"))
    metrics["val/seconds"] = time.perf_counter() - started
    peak, tables = all_reduce([peak_memory_bytes(), replicas.table_bytes()], device, "max")
    metrics["train/peak_memory_mb_per_worker"] = peak / 2**20
    metrics["train/table_mb_per_worker"] = tables / 2**20
    stopping = config.train.early_stopping
    value = metrics.get(stopping.metric, float("nan"))
    better = beats(value, state.best_value, stopping.metric)
    if better:
        state.best_epoch, state.best_value = epoch, value
    replicas.end_epoch(better)
    state.epoch = epoch
    state.history.append(metrics)
    return metrics


def stops_early(state: TrainingState, stopping: EarlyStopping) -> bool:
    """Whether `stopping.patience` epochs have passed without a better one."""
    return bool(stopping.patience) and state.epoch - state.best_epoch >= stopping.patience


def final_report(
    replicas: Replicas, state: TrainingState, config: Config, device: torch.device
) -> None:
    """Select the best epoch's model, evaluate it on the test split (when there is one), and
    report it as the final checkpoint."""
    replicas.select_best()
    final = {"final": 1, "epoch": state.epoch, "best_epoch": state.best_epoch}
    best_metrics = next((h for h in state.history if h["epoch"] == state.best_epoch), {})
    final.update({f"best/{k}": v for k, v in best_metrics.items() if k.startswith("val/")})
    test_shard = _test_shard()
    if test_shard is not None:
        eval_rows = config.data.batch_size * EVAL_BATCHES_PER_TRAIN_BATCH
        batches = replicas.eval_batches(test_shard, eval_rows, device)
        final.update(evaluate(replicas.network, batches, config, device, "test"))
    state.final = True
    replicas.report(state, copy.deepcopy(final))


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. `loop_config` holds `config` (the Config as a JSON dict),
    `preprocessor` (fitted statistics), `mlflow_run_id`, and optionally `resume_from` and
    `warm_start` (an object ref of the network's initial state dict)."""
    quiet_worker_logging()
    config = parse_config(loop_config["config"], source="train_loop_config")
    torch.manual_seed(config.train.seed)
    device = _worker_device(config.train)
    replicas, state, restored = restore_or_init(loop_config, config, device)
    step = make_step(replicas, config, device)
    for epoch in range(state.epoch + 1, config.train.epochs + 1):
        if state.final:
            break
        metrics = run_epoch(step, replicas, state, config, device, epoch, restored)
        replicas.report(state, metrics)
        if stops_early(state, config.train.early_stopping):
            break
    if not state.final:
        final_report(replicas, state, config, device)


def _test_shard() -> Any:
    try:
        return ray.train.get_dataset_shard("test")
    except (KeyError, ValueError):
        return None
