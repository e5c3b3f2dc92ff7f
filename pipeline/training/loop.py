"""The Ray Train worker loop: one plain function of a config dict (the Ray Train examples'
pattern), the same for a single run, a Tune trial and a cluster job.

It reads as setup -> epoch x E -> final. Setup restores the run's checkpoint (a restart or
a resume, at an epoch's end or inside an epoch) or starts from scratch or a warm start,
under the worker strategy the config asks for (`replicas.make_replicas`), and opens this
worker's data (`pipeline.data.feed.WorkerFeed`). Each epoch steps through this worker's
batches; between steps, on the intervals of `train.log_every`, `validate_every` and
`checkpoint_every` (`pipeline.training.schedule`), the workers report step metrics, run
the validation pass, and write a checkpoint holding their position in the epoch. Every
epoch ends with a validation and a checkpoint. After the last epoch, the best validation's
model is evaluated on the test split (when there is one) and reported as the final
checkpoint.

Every report carries `global_step` (the MLflow step of its metrics) and `validations` (the
time axis of Tune's ASHA). A checkpoint written inside an epoch records the steps taken in
it, each worker's running sums of the epoch and its RNG state: a resumed worker continues
at the next batch of the same sequence (`pipeline.data.plan`), and the run ends as an
uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import GRADIENT_METHODS, Config, EarlyStopping, TrainConfig, parse_config
from pipeline.data.feed import Budget, WorkerFeed
from pipeline.data.ingest import READ_BLOCK_BYTES
from pipeline.data.plan import SplitRows
from pipeline.data.preprocess import Preprocessor
from pipeline.intervals import parse_interval
from pipeline.metrics_vocab import beats
from pipeline.training.checkpoint import TrainingState, load_checkpoint
from pipeline.training.faults import fault_trigger
from pipeline.training.losses import build_training_model
from pipeline.training.metrics import MultiTaskMetrics
from pipeline.training.optim import set_epoch_lr
from pipeline.training.replicas import Replicas, make_replicas
from pipeline.training.reporting import all_reduce, peak_memory_bytes, report
from pipeline.training.schedule import Due, Schedule
from pipeline.training.step import TrainStep, resolve_step_mode

EVAL_BATCHES_PER_TRAIN_BATCH = 4  # evaluation batches are this many training batches
PROGRESS_PUSH_S = 2.0  # rank 0 tells the driver's progress board this often


class NonFiniteLoss(RuntimeError):
    """The training loss turned NaN or infinite: training stops before the next checkpoint,
    so the last reported (good) one stays the run's newest."""


def make_step(replicas: Replicas, config: Config, device: torch.device) -> TrainStep:
    """This worker's train step over the strategy's module and optimizer, in the configured
    mode (`pipeline.training.step`)."""
    train = config.train
    balancing = train.loss_weighting in GRADIENT_METHODS
    workers = ray.train.get_context().get_world_size()
    mode = resolve_step_mode(train.step_mode, device, config.model.embeddings, balancing, workers)
    balancer = None
    if balancing:
        from pipeline.training.balancing import GradientBalancer  # torchjd: only when asked

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


@dataclass
class Tally:
    """This worker's sums over some steps: losses weighted by rows, rows, steps, seconds."""

    loss: float = 0.0
    tasks: list[float] = field(default_factory=list)
    rows: int = 0
    steps: int = 0
    seconds: float = 0.0

    def add(self, other: Tally) -> None:
        self.loss += other.loss
        self.tasks = [
            a + b for a, b in zip(self.tasks or [0.0] * len(other.tasks), other.tasks, strict=True)
        ]
        self.rows += other.rows
        self.steps += other.steps
        self.seconds += other.seconds

    def reduced(self, config: Config, device: torch.device, prefix: str) -> dict[str, float]:
        """The sums of every worker as metrics under `prefix` (`train`, `step`)."""
        tasks = self.tasks or [0.0] * len(config.data.tasks)
        loss, rows, seconds, *task_sums = all_reduce(
            [self.loss, self.rows, self.seconds, *tasks], device
        )
        # Seconds are summed over workers: divided by the world size, the mean wall time.
        seconds /= ray.train.get_context().get_world_size()
        out = {
            f"{prefix}/loss": loss / max(rows, 1),
            f"{prefix}/rows": rows,
            f"{prefix}/seconds": seconds,
            f"{prefix}/samples_per_s": rows / max(seconds, 1e-9),
        }
        for task, value in zip(config.data.tasks, task_sums, strict=True):
            out[f"{prefix}/{task.name}/loss"] = value / max(rows, 1)
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
    """The seed of one worker's epoch: torch's RNG restarts from it, so an epoch re-run
    from its start repeats the uninterrupted run's epoch."""
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2**31


def quiet_worker_logging() -> None:
    """Keep the INFO lines of the libraries a worker runs off the console: warnings only.

    Ray Train sets a worker's root logger to INFO, and two libraries log through it at every
    report or model build, several KB a worker each time, above the one-line epoch summary
    (`RunLogger`): Ray Train 2.60's `TrainingReport(checkpoint=..., metrics={...})` of
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


def worker_device(train: TrainConfig) -> torch.device:
    """This worker's device; on a CPU, torch gets `train.threads_per_worker` threads, else
    the worker's whole reserved CPUs (at least one). Torch sizes its pool from the node's
    cores when it is imported, before Ray's OMP_NUM_THREADS applies: two workers of 0.5 CPU
    on 2 cores would otherwise run 4 threads, which spin against each other and against
    the read tasks (a cached epoch's row gathers ran 6x slower)."""
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(train.threads_per_worker or max(1, int(train.cpus_per_worker)))
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


def make_feed(loop_config: dict[str, Any], config: Config, device: torch.device) -> WorkerFeed:
    """This worker's data: its rows of each split and epoch, streamed or cached."""
    context = ray.train.get_context()
    world, rank = context.get_world_size(), context.get_world_rank()
    budget = Budget.of(
        loop_config["cluster_cpus"], world, config.train.cpus_per_worker, READ_BLOCK_BYTES
    )
    preprocessor = Preprocessor.from_dict(loop_config["preprocessor"])
    feed = WorkerFeed(
        SplitRows.from_dict(loop_config["counts"]),
        preprocessor,
        rank,
        world,
        device,
        config.train.seed,
        budget,
    )
    device_budget, host_budget = cache_budgets(config, device, context.get_local_world_size())
    feed.keep_what_fits(config.data.cache, device_budget, host_budget)
    return feed


def cache_budgets(config: Config, device: torch.device, local_workers: int) -> tuple[int, int]:
    """(device, host) bytes a worker's cache may take: `data.cache_budget_gb`, else a
    quarter of its share of the GPU, and a quarter of the node's memory over its workers."""
    import psutil

    if config.data.cache_budget_gb is not None:
        budget = int(config.data.cache_budget_gb * 2**30)
        return budget, budget
    gpu = 0
    if device.type == "cuda":
        share = config.train.gpus_per_worker
        gpu = int(torch.cuda.get_device_properties(device).total_memory * share / 4)
    host = int(psutil.virtual_memory().total / 4 / max(local_workers, 1))
    return gpu, host


def stops_early(state: TrainingState, stopping: EarlyStopping) -> bool:
    """Whether `stopping.patience` epochs have passed without a better one."""
    return bool(stopping.patience) and state.epoch - state.best_epoch >= stopping.patience


class WorkerRun:
    """One worker's training: the state, the step, the data and the schedule.

    Args:
        loop_config: what `train_loop` received (see there).
    """

    def __init__(self, loop_config: dict[str, Any]) -> None:
        self.config = parse_config(loop_config["config"], source="train_loop_config")
        train = self.config.train
        torch.manual_seed(train.seed)
        if train.deterministic:  # the data's order is the same in every run anyway
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.device = worker_device(train)
        self.replicas, self.state, self.restored = restore_or_init(
            loop_config, self.config, self.device
        )
        self.feed = make_feed(loop_config, self.config, self.device)
        self.step = make_step(self.replicas, self.config, self.device)
        intervals = (train.log_every, train.validate_every, train.checkpoint_every)
        self.schedule = Schedule(*(parse_interval(i) for i in intervals), device=self.device)
        self.rank = ray.train.get_context().get_world_rank()
        self.batch = self.config.data.batch_size
        self.per_epoch = self.feed.batches_per_epoch(self.batch)
        self.progress = loop_config.get("progress") if self.rank == 0 else None
        self.epoch_tally, self.interval = Tally(), Tally()
        self._pushed, self.cache_hit = 0.0, False
        # (global step, epoch, steps into it) of the newest checkpoint, None before any.
        self.checkpointed: tuple[int, int, int] | None = None
        if self.restored:
            inside = self.state.step_in_epoch
            epoch = self.state.epoch + (1 if inside else 0)
            self.checkpointed = (self.state.global_step, epoch, inside)
            if inside:
                self._restore_worker()

    def run(self) -> None:
        """setup -> epoch x E -> final."""
        for epoch in range(self.state.epoch + 1, self.config.train.epochs + 1):
            if self.state.final:
                break
            self.train_epoch(epoch)
            if stops_early(self.state, self.config.train.early_stopping):
                break
        if not self.state.final:
            self.final_report()

    def train_epoch(self, epoch: int) -> None:
        """Step through the epoch's batches from the position the state holds, with the
        events the schedule asks for between steps; then the epoch's end."""
        start = self.state.step_in_epoch
        if not start:
            torch.manual_seed(epoch_seed(self.config.train.seed, epoch, self.rank))
            self.epoch_tally = Tally()
        lr = set_epoch_lr(self.replicas.optimizer, self.replicas.base_lrs, self.config.train, epoch)
        trigger = fault_trigger(epoch, self.rank, self.restored, self.per_epoch)
        self.cache_hit = self.feed.cache_hit()
        batches = self.replicas.train_batches(self.feed.train(epoch, self.batch, start), self.batch)
        self.replicas.module.train()
        clock = time.perf_counter()
        for batch in batches:
            if trigger is not None:
                trigger(self.state.step_in_epoch, batch)
            real = int(batch.pop("rows")) if "rows" in batch else batch["labels"].shape[0]
            self.step(batch, real)
            self.state.global_step += 1
            self.state.step_in_epoch += 1
            self.interval.rows += real
            self.interval.steps += 1
            self._push_progress(epoch)
            if self.state.step_in_epoch < self.per_epoch:
                due = self.schedule.after_step(self.state.global_step)
                if due:
                    self.interval.seconds += time.perf_counter() - clock
                    self.inside_epoch(epoch, due, lr)
                    self.replicas.module.train()
                    clock = time.perf_counter()
        self.interval.seconds += time.perf_counter() - clock
        self.end_epoch(epoch, lr)

    def inside_epoch(self, epoch: int, due: Due, lr: float) -> None:
        """Log, validate and checkpoint between two steps of `epoch`, as `due` says."""
        interval = self._close_interval(epoch)
        metrics = self._position(epoch)
        if due.log:
            metrics.update(interval.reduced(self.config, self.device, "step"))
            metrics["step/lr"] = lr
        if due.validate:
            metrics.update(self.validate(epoch))
        self.report(metrics, checkpoint=due.checkpoint)

    def end_epoch(self, epoch: int, lr: float) -> None:
        """The epoch's metrics, its validation and its checkpoint."""
        self._close_interval(epoch)
        metrics = {
            "epoch": epoch,
            "epoch_end": 1,
            "train/lr": lr,
            **self.epoch_tally.reduced(self.config, self.device, "train"),
            "train/steps_per_worker": self.epoch_tally.steps,
            "train/restarts": self.state.restarts,
        }
        self.state.epoch, self.state.step_in_epoch = epoch, 0
        metrics.update(self.validate(epoch))
        peak, tables = all_reduce(
            [peak_memory_bytes(), self.replicas.table_bytes()], self.device, "max"
        )
        metrics["train/peak_memory_mb_per_worker"] = peak / 2**20
        metrics["train/table_mb_per_worker"] = tables / 2**20
        metrics.update(self._cache_metrics())
        metrics["global_step"] = self.state.global_step
        self.state.history.append(metrics)
        self.schedule.fired("validate", "checkpoint")
        self.report(metrics, checkpoint=True)

    def validate(self, epoch: int) -> dict[str, float]:
        """The validation pass; keeps the weights when they are the best so far."""
        started = time.perf_counter()
        rows = self.batch * EVAL_BATCHES_PER_TRAIN_BATCH
        batches = self.replicas.eval_batches(self.feed.evaluation("validation", rows), rows)
        metrics = evaluate(self.replicas.network, batches, self.config, self.device, "val")
        metrics["val/seconds"] = time.perf_counter() - started
        stopping = self.config.train.early_stopping
        value = metrics.get(stopping.metric, float("nan"))
        improved = beats(value, self.state.best_value, stopping.metric)
        if improved:
            self.state.best_epoch, self.state.best_value = epoch, value
            self.state.best_step = self.state.global_step
            self.state.best_metrics = {k: v for k, v in metrics.items() if k.startswith("val/")}
        self.replicas.validated(improved)
        self.state.validations += 1
        return metrics

    def report(self, metrics: dict[str, float], checkpoint: bool) -> None:
        """Report `metrics` (every worker), with a checkpoint of the state now."""
        metrics.update(global_step=self.state.global_step, validations=self.state.validations)
        if not checkpoint:
            report(metrics, None)
            return
        self.state.workers = self._gather_workers()
        self.replicas.report(self.state, copy.deepcopy(metrics))
        inside = self.state.step_in_epoch
        epoch = self.state.epoch + (1 if inside else 0)
        self.checkpointed = (self.state.global_step, epoch, inside)

    def final_report(self) -> None:
        """Select the best validation's model, evaluate it on the test split (when there
        is one), and report it as the final checkpoint."""
        self.replicas.select_best(self.state)
        state = self.state
        final = {"final": 1, "epoch": state.epoch, "best_epoch": state.best_epoch}
        final.update({f"best/{k}": v for k, v in state.best_metrics.items()})
        if "test" in self.feed.counts.rows:
            rows = self.batch * EVAL_BATCHES_PER_TRAIN_BATCH
            batches = self.replicas.eval_batches(self.feed.evaluation("test", rows), rows)
            final.update(evaluate(self.replicas.network, batches, self.config, self.device, "test"))
        state.final = True
        self.report(final, checkpoint=True)

    def _close_interval(self, epoch: int) -> Tally:
        """The interval's sums since the last event (the step's loss sums read once), added
        to the epoch's; NonFiniteLoss when the training loss turned NaN or infinite."""
        loss, tasks = self.step.sums()
        interval, self.interval = self.interval, Tally()
        interval.loss, interval.tasks = loss, tasks
        self.epoch_tally.add(interval)
        (total,) = all_reduce([interval.loss], self.device)
        if not math.isfinite(total):  # the same sum on every worker: all stop
            raise NonFiniteLoss(
                f"epoch {epoch}: the training loss is {total}; {self._last_good()}. "
                "Lower train.lr, or set train.grad_clip"
            )
        return interval

    def _last_good(self) -> str:
        """Where the run's last checkpoint stands, for the NaN message."""
        if self.checkpointed is None:
            return "no epoch finished, so the run has no checkpoint"
        step, epoch, inside = self.checkpointed
        if not inside:
            return f"the last good checkpoint is epoch {epoch}'s"
        return (
            f"the last good checkpoint is step {step}'s ({inside} of {self.per_epoch} steps "
            f"of epoch {epoch})"
        )

    def _position(self, epoch: int) -> dict[str, float]:
        return {"epoch_progress": epoch - 1 + self.state.step_in_epoch / self.per_epoch}

    def _cache_metrics(self) -> dict[str, float]:
        cache = self.feed.cached.get("train")
        size = sum(c.nbytes() for c in self.feed.cached.values())
        (most,) = all_reduce([size], self.device, "max")
        return {
            "data/cache_hit": float(self.cache_hit),
            "data/cache_mb_per_worker": most / 2**20,
            "data/cached_rows": float(cache.filled if cache else 0),
        }

    def _gather_workers(self) -> list[dict[str, Any]]:
        """Every worker's running sums and RNG states (rank 0 writes them)."""
        mine = {"tally": asdict(self.epoch_tally), "rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if not (dist.is_available() and dist.is_initialized()):
            return [mine]
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return everyone

    def _restore_worker(self) -> None:
        """Inside an epoch: this worker's running sums and RNG state as they were."""
        mine = self.state.workers[self.rank]
        self.epoch_tally = Tally(**mine["tally"])
        torch.set_rng_state(mine["rng"])
        if "cuda_rng" in mine and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda_rng"], self.device)

    def _push_progress(self, epoch: int) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if now - self._pushed < PROGRESS_PUSH_S and self.state.step_in_epoch < self.per_epoch:
            return
        self._pushed = now
        rows = self.feed.rows("train")
        world = ray.train.get_context().get_world_size()
        self.progress.update.remote(
            epoch=epoch,
            rows=min(self.state.step_in_epoch * self.batch, rows) * world,
            rows_per_epoch=rows * world,
        )


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. `loop_config` holds `config` (the Config as a JSON dict),
    `preprocessor` (fitted statistics), `counts` (each file's rows of each split),
    `cluster_cpus`, `mlflow_run_id`, and optionally `resume_from`, `warm_start` (an object
    ref of the network's initial state dict) and `progress` (the driver's progress board)."""
    quiet_worker_logging()
    WorkerRun(loop_config).run()
