"""Sharded id tables (`model.embeddings: torchrec`): TorchRec model parallelism inside the
Ray Train worker loop.

The network's `EmbeddingBagCollection` (`models.torchrec_input`) is sharded by TorchRec's
planner across the Ray Train workers, over the process group Ray Train made (gloo on CPU,
NCCL on GPU); the rest of the network (the backbone, the towers, the loss) stays data
parallel under DDP, as `DistributedModelParallel` wraps it. The tables are updated by
FBGEMM's fused row-wise Adagrad inside the backward pass, so a step costs what the rows
a batch touches cost, whatever the vocabulary: no table gradient is materialised or
all-reduced, and the optimizer keeps one value per row.

Every forward and backward of a sharded table is a collective (all-to-all of ids and
embeddings), with one batch size on every worker, so the workers step in lockstep:
`lockstep` pads batches to one size and feeds a worker whose shard is exhausted empty
(fully masked) batches until every worker is done, in training and in evaluation. Checkpoints are
sharded: each worker writes its shards with torch's distributed checkpoint (DCP) into its
own folder, which Ray Train merges into one checkpoint; `load_dense_weights` reads them
back as full tables on one process, for the logged model.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from models import build_model
from models.torchrec_input import dense_names
from pipeline.config import Config, TrainConfig
from pipeline.data.collate import pad
from pipeline.data.preprocess import Preprocessor
from pipeline.training.checkpoint import TrainingState, save_checkpoint
from pipeline.training.losses import TrainingModel
from pipeline.training.optim import base_rates, make_optimizer
from pipeline.training.reporting import nbytes, report

SHARDED_FOLDER = "sharded"  # the DCP checkpoint inside a Ray Train checkpoint folder
TABLES = "model.inputs.tables"  # the tables' prefix in the training module's state dict


def _row_wise_sharder() -> Any:
    """TorchRec's `EmbeddingBagCollectionSharder`, offering the model-parallel layouts only,
    row-wise on CPU included.

    TorchRec 1.8 lists row-wise (and table-row-wise) for CUDA only. Its row-wise sharding
    (an all-to-all of the ids, a reduce-scatter of the pooled embeddings) runs over gloo
    too; `tests/pipeline/training/test_sharding.py` checks it against the dense model.
    Data-parallel is left out: every table here trains with a fused optimizer in the
    backward pass, which is what model-parallel tables get.
    """
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.types import ShardingType

    class Sharder(EmbeddingBagCollectionSharder):
        def sharding_types(self, compute_device_type: str) -> list[str]:
            types = super().sharding_types(compute_device_type)
            extra = [ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value]
            types = [*types, *(t for t in extra if t not in types)]
            return [t for t in types if t != ShardingType.DATA_PARALLEL.value]

    return Sharder()


def shard(
    training_model: TrainingModel,
    train: TrainConfig,
    device: torch.device,
    table_optimizer: type | None = None,
) -> tuple[nn.Module, ShardedOptimizer]:
    """Shard the training module's tables across the process group's workers.

    Args:
        training_model: built with `model.embeddings: torchrec` (tables on the meta device).
        train: `sharding` (TorchRec's planner chooses with `auto`), `lr`, `embedding_lr`,
            `weight_decay`, `optimizer` of the dense part.
        device: this worker's device.
        table_optimizer: the fused table optimizer's class (default: TorchRec's row-wise
            Adagrad; tests use SGD to read gradients off the update).

    Returns:
        The `DistributedModelParallel` module and its optimizer.
    """
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
    from torchrec.distributed.types import ShardingEnv
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    tables = training_model.model.inputs.tables
    table_lr = train.embedding_lr or train.lr
    apply_optimizer_in_backward(
        table_optimizer or RowWiseAdagrad, tables.parameters(), {"lr": table_lr}
    )
    world = dist.get_world_size()
    constraints = None
    if train.sharding != "auto":
        constraints = {
            config.name: ParameterConstraints(sharding_types=[train.sharding])
            for config in tables.embedding_bag_configs()
        }
    local_world = torch.cuda.device_count() if device.type == "cuda" else world
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world, local_world_size=local_world),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    sharders = [_row_wise_sharder()]
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    plan = planner.collective_plan(training_model, sharders, dist.group.WORLD)
    module = DistributedModelParallel(
        training_model,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=device,
        plan=plan,
        sharders=sharders,
    )
    return module, ShardedOptimizer(module, train)


class ShardedOptimizer:
    """The dense part's Adam (or AdamW) and the tables' fused optimizer, seen as one.

    The fused optimizer updates the tables inside the backward pass; its `step` only pushes
    the learning rate of its parameter groups to FBGEMM, so a schedule that sets
    `param_groups[i]["lr"]` (`pipeline.training.loop.set_epoch_lr`) drives both parts.
    `param_groups` are the dense group, then the table groups.
    """

    def __init__(self, module: nn.Module, train: TrainConfig) -> None:
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        dense = [p for _, p in in_backward_optimizer_filter(module.named_parameters())]
        self.dense = make_optimizer(dense, train)
        self.tables = module.fused_optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [*self.dense.param_groups, *self.tables.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.dense.step()
        self.tables.step()

    def state_dict(self) -> dict[str, Any]:
        """The dense part's state (replicated, kept in the rank-0 checkpoint file); the
        tables' state is sharded and saved with them (`save_sharded`)."""
        return self.dense.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dense.load_state_dict(state)
        self.tables.step()  # push the restored rates


def lockstep(
    batches: Iterator[dict[str, torch.Tensor]],
    batch_size: int,
    empty: dict[str, torch.Tensor],
    device: torch.device,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of exactly `batch_size` rows on every worker, until every worker is done.

    A short batch is padded, and a worker whose shard is exhausted (or empty) gets batches
    of padding: rows of id 0 whose `mask` and `weight` are 0, so they count in no loss or
    metric. Each batch holds its number of real rows as `rows` (a 0-d tensor). Every
    worker must call this, with the same `batch_size`.

    Args:
        batches: this worker's batches (at most `batch_size` rows each).
        empty: a batch of no rows, in the layout of `batches` (`Preprocessor.empty`).
        device: where the batches are (the flag the workers exchange goes there too).
    """
    batches = iter(batches)
    while True:
        batch = next(batches, None)
        more = torch.tensor([batch is not None], dtype=torch.int64, device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            return
        batch = batch if batch is not None else empty
        rows = next(iter(batch.values())).shape[0]
        yield {**pad(batch, batch_size), "rows": torch.tensor(rows)}


def snapshot(module: nn.Module) -> dict[str, Any]:
    """A copy of the module's state: plain tensors cloned, sharded tables as clones of this
    worker's shards (so a best-epoch copy costs a worker its shards, not the tables)."""
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

    out = {}
    for key, value in module.state_dict().items():
        if isinstance(value, ShardedTensor):
            shards = [Shard(s.tensor.detach().clone(), s.metadata) for s in value.local_shards()]
            out[key] = ShardedTensor._init_from_local_shards_and_global_metadata(
                shards, value.metadata(), process_group=dist.group.WORLD
            )
        else:
            out[key] = value.detach().clone()
    return out


def load_snapshot(module: nn.Module, state: dict[str, Any]) -> None:
    """Copy a `snapshot` (or a loaded sharded checkpoint) back into the module."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    current = module.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if isinstance(value, ShardedTensor):
                for target, source in zip(
                    current[key].local_shards(), value.local_shards(), strict=True
                ):
                    target.tensor.copy_(source.tensor)
            else:
                current[key].copy_(value)


def load_full_weights(module: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy full tensors, named as the module's state dict names them, into the module: a
    sharded table takes the rows and columns of this worker's shards."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    current = module.state_dict()
    with torch.no_grad():
        for key, value in full.items():
            target = current[key]
            if not isinstance(target, ShardedTensor):
                target.copy_(value)
                continue
            for shard_ in target.local_shards():
                (row, col), (rows, cols) = (
                    shard_.metadata.shard_offsets,
                    shard_.metadata.shard_sizes,
                )
                shard_.tensor.copy_(value[row : row + rows, col : col + cols])


def save_sharded(module: nn.Module, best: dict[str, Any] | None, folder: str | Path) -> None:
    """Write this worker's shards (model, best model, table optimizer) into `folder`
    with DCP; every worker calls it, each with its own folder."""
    state = {"model": module.state_dict(), "tables_optimizer": module.fused_optimizer.state_dict()}
    if best is not None:
        state["best_model"] = best
    dcp.save(state, checkpoint_id=str(Path(folder) / SHARDED_FOLDER))


def load_sharded(module: nn.Module, folder: str | Path, with_best: bool) -> dict[str, Any] | None:
    """Load a sharded checkpoint into the module (and its table optimizer); return the best
    model's state when the checkpoint holds one (`with_best`). Every worker calls it."""
    state = {"model": module.state_dict(), "tables_optimizer": module.fused_optimizer.state_dict()}
    if with_best:
        state["best_model"] = snapshot(module)
    dcp.load(state, checkpoint_id=str(Path(folder) / SHARDED_FOLDER))
    load_snapshot(module, state["model"])
    module.fused_optimizer.load_state_dict(state["tables_optimizer"])
    return state.get("best_model")


def load_dense_weights(folder: str | Path, config: Config) -> dict[str, torch.Tensor]:
    """The selected model of a sharded checkpoint as the dense network's state dict, read
    on one process without a process group: full tables, named as `FeatureInput` names
    them (a multi-hot table's padding row 0 set to zero, as the dense layer keeps it)."""
    schema = config.data.feature_schema()
    network = build_model(config.model.model_copy(update={"embeddings": "dense"}), schema)
    target = network.state_dict()
    names = {f"model.inputs.{k}": f"inputs.{v}" for k, v in dense_names(schema).items()}
    template = {
        saved: target[names.get(saved, saved.removeprefix("model."))]
        for saved in _saved_model_keys(folder)
    }
    dcp.load({"model": template}, checkpoint_id=str(Path(folder) / SHARDED_FOLDER), no_dist=True)
    with torch.no_grad():
        for j in range(len(schema.multi_hot)):
            target[f"inputs.bags.{j}.weight"][0].zero_()
    return target


def _saved_model_keys(folder: str | Path) -> list[str]:
    """The network's keys in a sharded checkpoint (`model.` keys without the loss's)."""
    reader = dcp.FileSystemReader(str(Path(folder) / SHARDED_FOLDER))
    keys = [k.removeprefix("model.") for k in reader.read_metadata().state_dict_metadata]
    return [k for k in keys if k.startswith("model.")]


class Sharded:
    """The worker strategy with sharded tables (`replicas.Replicas`; see `replicas.Replicated`).

    Checkpoints: every worker writes its shards (model, best model when it is not the
    current one, table optimizer) into its own folder, which Ray Train merges into one
    checkpoint; rank 0 adds `checkpoint.pt` (epoch, history, config, the dense optimizer).

    Args:
        training_model: built with `model.embeddings: torchrec`.
        train: the `train:` config section.
        device: this worker's device.
        preprocessor: the run's preprocessing (the batches' layout, an empty batch).
        state: the state to continue from, or None.
        folder: the checkpoint folder `state` came from.
        table_optimizer: see `shard`.
        initial: without `state`, full weights of the network to start from (warm start).
    """

    def __init__(
        self,
        training_model: TrainingModel,
        train: TrainConfig,
        device: torch.device,
        preprocessor: Preprocessor,
        state: TrainingState | None = None,
        folder: str | None = None,
        table_optimizer: type | None = None,
        initial: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.module, self.optimizer = shard(training_model, train, device, table_optimizer)
        self.base_lrs = base_rates(self.optimizer)
        self.network = self.module.module.model
        self.device = device
        empty = preprocessor.empty()
        self.empty = {k: torch.from_numpy(v).to(device) for k, v in empty.items()}
        self.best: dict[str, Any] | None = None
        if state is not None:
            if not state.sharded:
                raise ValueError(
                    f"{folder}: a checkpoint of dense tables; it resumes with "
                    "model.embeddings: dense"
                )
            validated = state.best_epoch > 0 or state.best_step is not None
            with_best = validated and not state.best_is_current()
            self.best = load_sharded(self.module, folder, with_best)
            if validated and state.best_is_current():
                self.best = snapshot(self.module)
            self.optimizer.load_state_dict(state.optimizer)
        elif initial is not None:  # a dense network's weights (a warm start): cut into shards
            schema = training_model.model.schema
            torchrec = {f"inputs.{v}": f"inputs.{k}" for k, v in dense_names(schema).items()}
            full = {f"model.{torchrec.get(k, k)}": v for k, v in initial.items()}
            load_full_weights(self.module, full)

    def train_batches(self, batches: Iterator[Any], batch_size: int) -> Iterator[Any]:
        return lockstep(batches, batch_size, self.empty, self.device)

    def eval_batches(self, batches: Iterator[Any], batch_size: int) -> Iterator[Any]:
        return lockstep(batches, batch_size, self.empty, self.device)

    def table_bytes(self) -> int:
        """What the id tables hold on this worker: its shards of their weights and of the
        fused optimizer's state."""
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        def local(values: Any) -> int:
            if isinstance(values, ShardedTensor):
                return sum(nbytes(s.tensor) for s in values.local_shards())
            if isinstance(values, dict):
                return sum(local(v) for v in values.values())
            return 0

        weights = {k: v for k, v in self.module.state_dict().items() if k.startswith(TABLES)}
        return local(weights) + local(self.module.fused_optimizer.state_dict()["state"])

    def validated(self, improved: bool) -> None:
        if improved:  # this worker's shards of the weights now
            self.best = snapshot(self.module)

    def select_best(self, state: TrainingState) -> None:
        if self.best is not None:
            load_snapshot(self.module, self.best)

    def report(self, state: TrainingState, metrics: dict[str, float]) -> None:
        state.optimizer = self.optimizer.state_dict()
        with tempfile.TemporaryDirectory() as folder:
            save_sharded(self.module, None if state.best_is_current() else self.best, folder)
            if dist.get_rank() == 0:
                save_checkpoint(state, folder)
            report(metrics, folder)
