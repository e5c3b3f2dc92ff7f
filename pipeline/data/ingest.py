"""Ray Data ingest: Parquet -> split filter + preprocess -> `iter_torch_batches`.

Datasets are lazy and streaming: nothing is materialised, each block is read, filtered to
its split and preprocessed in one fused `map_batches` task, then handed to the train
workers. Shuffling is deliberately cheap: the train split reads its files in a new random
order every epoch (`shuffle="files"`) and `iter_batches` permutes rows within chunks of a
few batches. That is not a global shuffle: rows of one file stay near
each other within an epoch, which is fine for logs whose files are not sorted by label.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data
import ray.train
from ray.data.collate_fn import NumpyBatchCollateFn

from pipeline.config import DataConfig
from pipeline.data.collate import Layout, Packed, Prefetcher, rows_of
from pipeline.data.files import DECODE_ERRORS, InputFiles, first_unreadable
from pipeline.data.preprocess import Preprocessor
from pipeline.data.split import prune_files, split_mask, split_names

# Object-store budget of one dataset's pipeline. Without it Ray Data lets blocks pile up
# to a share of the whole object store when the consumer is slower than the readers, and
# memory grows with the data instead of staying flat. Four blocks: on 2 CPUs bench/ingest.py
# measured 1.11x peak memory for 10x the rows at 64 MiB, 1.34x at 256 MiB, for ~15 % less
# throughput (still several times what a train step consumes).
OBJECT_STORE_LIMIT_BYTES = 64 * 2**20


# Largest block the Parquet reader emits. Ray's default (128 MiB) makes a read task
# decode a whole file of a few hundred MB at once, so memory grows with the file size.
READ_BLOCK_BYTES = 16 * 2**20
READ_AHEAD_BATCHES = 2
# CPUs a read-and-preprocess task reserves. Half a CPU, like a train worker: with workers
# spread over nodes of few CPUs (two workers of 0.5 on two 1-CPU nodes), no node has a
# whole CPU left, and tasks asking for one (Ray's default) would wait forever.
DATA_TASK_CPUS = 0.5


@contextlib.contextmanager
def _read_settings() -> Iterator[None]:
    """Build reads with Ray's V1 Parquet reader and bounded blocks.

    Ray 2.60's default V2 reader packs small files into one read task that emits a single
    block holding every row: no parallelism, and memory that grows with the data. V1 reads
    each file in its own task, in batches of at most `READ_BLOCK_BYTES`. V2 also starts 32
    footer-reader actors per read (`RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`): on a 2-CPU machine
    that took minutes for a read of 6,000 rows.
    """
    ctx = ray.data.DataContext.get_current()
    before = getattr(ctx, "use_datasource_v2", False), ctx.target_max_block_size
    ctx.use_datasource_v2 = False
    ctx.target_max_block_size = READ_BLOCK_BYTES
    try:
        yield
    finally:
        ctx.use_datasource_v2, ctx.target_max_block_size = before


def _to_block(batch: dict[str, np.ndarray]) -> pa.Table:
    """Numpy outputs as an Arrow table; 2-D arrays become Ray tensor columns.

    Built here rather than by Ray because Ray falls back to pickling a 2-D column when a
    batch is empty (all rows in another split), which breaks the block schema.
    """
    from ray.data.extensions import ArrowTensorArray

    return pa.table(
        {k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else v for k, v in batch.items()}
    )


def _prepare(batch: pa.Table, preprocessor: Preprocessor, split: str) -> pa.Table:
    data = preprocessor.data
    keep = split_mask(batch[data.split.column], data.split, split)
    return _to_block(preprocessor.transform(batch.filter(keep)))


def build_datasets(
    data: DataConfig,
    preprocessor: Preprocessor,
    files: InputFiles,
    *,
    shuffle_files: bool = True,
) -> dict[str, Any]:
    """One lazy `ray.data.Dataset` per split, yielding preprocessed batches.

    Args:
        data: the `data:` section of the config.
        preprocessor: fitted with `fit_preprocessor` (dense statistics).
        files: the files from `check_schema(data)`, in the order to read them.
        shuffle_files: read the train split's files in a random order each epoch.

    Returns:
        `{"train": ds, "validation": ds}` plus `"test"` when the split defines one. Each
        row has the columns of `Preprocessor.transform` (`categorical`, `dense`,
        `multi_hot.<column>`, `labels`, `mask`, `weight`).

    Example:
        >>> files = check_schema(cfg.data)  # doctest: +SKIP
        >>> ds = build_datasets(cfg.data, fit_preprocessor(cfg.data, files), files)
        >>> TorchTrainer(..., datasets=ds, dataset_config=configure_ray_data())
    """
    columns = data.columns(labels=True, split=True)
    out = {}
    for name in split_names(data.split):
        ds = read_files(
            prune_files(data.split, files, name), columns, shuffle_files and name == "train"
        )
        out[name] = ds.map_batches(
            _prepare,
            batch_format="pyarrow",
            # Each read block (at most READ_BLOCK_BYTES) is one preprocess call. A fixed
            # batch size would stop Ray from fusing the read and the preprocess into one
            # task (the filter changes row counts), doubling object-store traffic.
            batch_size=None,
            zero_copy_batch=True,
            num_cpus=DATA_TASK_CPUS,
            fn_kwargs={"preprocessor": preprocessor, "split": name},
        )
    return out


def read_files(files: list[str], columns: list[str], shuffle: bool = False) -> Any:
    """A lazy Ray Data read of `columns` of `files`: one task each, bounded blocks, a
    bounded object store, Ray's V1 Parquet reader (`_read_settings`). Every read of logs in
    the project goes through it (training, `predict`, `evaluate`)."""
    with _read_settings():
        ds = ray.data.read_parquet(
            files,
            columns=columns,
            # One read task per file. Ray would otherwise split each task's output into
            # several blocks to reach its minimum block count, and a split read cannot fuse
            # with the preprocess: every block would cross the object store twice. Blocks
            # stay bounded by `READ_BLOCK_BYTES` either way.
            override_num_blocks=len(files),
            # Arrow decodes at most this many batches (each up to READ_BLOCK_BYTES) ahead of
            # the preprocess (Ray's default: 8).
            batch_readahead=READ_AHEAD_BATCHES,
            shuffle="files" if shuffle else None,
            file_extensions=None,  # check_schema already chose the files
            # Columns come from the files: a `day=...` folder is a name, not a column.
            partitioning=None,
            ray_remote_args={"num_cpus": DATA_TASK_CPUS},
        )
    limits = ds.context.execution_options.resource_limits
    ds.context.execution_options.resource_limits = limits.copy(
        object_store_memory=OBJECT_STORE_LIMIT_BYTES
    )
    return ds


def _caused_by(err: BaseException | None, kinds: tuple[type[BaseException], ...]) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kinds):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def naming_corrupt_files(files: list[str], columns: list[str]) -> Iterator[None]:
    """A Ray Data read that cannot decode a file (a corrupt page behind a footer that passed
    the checks) raises a SchemaError naming the file, not Ray's error without its name. On
    that error path only, the files are read again here to find the one."""
    try:
        yield
    except Exception as err:
        if _caused_by(err, DECODE_ERRORS) and (named := first_unreadable(files, columns)):
            raise named from err
        raise


# A shuffled epoch is fetched in chunks of this many batches, whose rows are permuted.
SHUFFLE_CHUNK_BATCHES = 8


class _PackCollate(NumpyBatchCollateFn):
    """Ray Data's batch (numpy arrays) packed into one tensor per dtype (`Layout.pack`),
    pinned for a GPU. Ray runs it in its prefetch threads."""

    def __init__(self, layout: Layout, pin: bool) -> None:
        super().__init__()
        self.layout, self.pin = layout, pin

    def __call__(self, batch: dict[str, np.ndarray]) -> Packed:
        return self.layout.pack(batch, pin=self.pin)


def batch_layout(preprocessor: Preprocessor) -> Layout:
    """How `Preprocessor.transform`'s batches are packed (`pipeline.data.collate`)."""
    return Layout.of(preprocessor.empty())


def iter_batches(
    shard: Any,
    layout: Layout,
    batch_size: int,
    device: Any,
    shuffle: bool = False,
    seed: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Torch batches on `device` from a dataset shard (`ray.train.get_dataset_shard(name)`)
    or dataset: Ray Data packs each batch into one pinned host tensor per dtype
    (`layout`), `Prefetcher` copies it to the GPU one batch ahead on a side stream, and the
    named tensors come back as views (`Layout.unpack`).

    Args:
        shard: a `DataIterator` (train worker shard) or a `Dataset`.
        layout: the batches' packing (`batch_layout`).
        batch_size: rows per batch (the last one may be smaller).
        device: where the batches go (the train worker's device).
        shuffle: mix rows within chunks of `SHUFFLE_CHUNK_BATCHES` batches (train split).
        seed: seed of that mixing, for a reproducible order.

    Example:
        >>> for batch in iter_batches(shard, layout, 1024, "cuda:0", shuffle=True):
        ...     batch["labels"].shape  # doctest: +SKIP
        torch.Size([1024, 4])
    """
    import torch

    device = torch.device(device)
    chunks = shard.iter_torch_batches(
        batch_size=batch_size * SHUFFLE_CHUNK_BATCHES if shuffle else batch_size,
        collate_fn=_PackCollate(layout, pin=device.type == "cuda"),
        device="cpu",  # `Prefetcher` copies to the GPU, on its own stream
        prefetch_batches=2,
        drop_last=False,
    )
    on_device = Prefetcher(chunks, device)
    if not shuffle:
        return (layout.unpack(chunk) for chunk in on_device)
    return (layout.unpack(b) for b in _shuffled(on_device, batch_size, seed))


def _shuffled(chunks: Iterator[Packed], batch_size: int, seed: int | None) -> Iterator[Packed]:
    """Batches of `batch_size` rows cut from each chunk after permuting its rows.

    Does what Ray's `local_shuffle_buffer_size` does (rows move among a few batches'
    worth of neighbours) at a fraction of the cost: one permutation per chunk in torch
    instead of per-batch buffer bookkeeping in Ray, which halved ingest throughput.
    Yields as many batches as unshuffled iteration would: ceil(rows / batch_size).
    """
    import torch

    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    for chunk in chunks:
        rows = rows_of(chunk)
        order = torch.randperm(rows, generator=generator)
        mixed = {k: v[order.to(v.device)] for k, v in chunk.items()}
        for start in range(0, rows, batch_size):
            yield {k: v[start : start + batch_size] for k, v in mixed.items()}


class ExactEvalDataConfig(ray.train.DataConfig):
    """`ray.train.DataConfig` that splits only `train` into equal shards.

    Equal shards drop up to `num_workers - 1` rows per epoch; the train split needs them
    (DDP hangs if workers see different batch counts), but validation and test metrics
    should see every row, so those are split with `equal=False`.
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        equal = {k: v for k, v in datasets.items() if k == "train"}
        exact = {k: v for k, v in datasets.items() if k != "train"}
        output = super().configure(equal, world_size, worker_handles, worker_node_ids, **kwargs)
        hints = worker_node_ids if getattr(self, "_enable_shard_locality", True) else None
        for name, ds in exact.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            shards = ds.streaming_split(world_size, equal=False, locality_hints=hints)
            for i, shard in enumerate(shards):
                output[i][name] = shard
        return output


def configure_ray_data(
    num_workers: int = 2, cpus_per_worker: float = 0.5, preserve_order: bool = False
) -> ExactEvalDataConfig:
    """Make Ray Data leave the train workers' CPUs alone, so neither side starves.

    Sets the driver's global `DataContext` (resource limits, order, no progress bars), so
    call it before `build_datasets`: datasets capture the context they are made in.

    On a small machine (2 CPUs), train workers holding whole CPUs leave Ray Data no CPU
    for its read tasks and the job hangs silently. Workers should take fractional CPUs
    (`cpus_per_worker`), and Ray Data is capped at the CPUs that remain (at least one) and
    at `OBJECT_STORE_LIMIT_BYTES` of object store (flat memory for any data size).
    The returned `ray.train.DataConfig` carries the same limits (Ray Train applies a
    dataset's options from its `DataConfig`). It shards every dataset across workers;
    `train` in equal shards (up to `num_workers - 1` rows dropped per epoch, as DDP needs),
    the others exactly (every row seen once).

    Args:
        num_workers: train workers.
        cpus_per_worker: CPUs each train worker reserves.
        preserve_order: blocks reach the workers in file order and are split among them
            the same way every time (`train.deterministic`), at some cost in throughput.

    Returns:
        A `ray.train.DataConfig` for `TorchTrainer(dataset_config=...)`.

    Example:
        >>> trainer = TorchTrainer(train_loop, datasets=datasets,  # doctest: +SKIP
        ...     scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        ...     dataset_config=configure_ray_data(2, 0.5))
    """
    from ray.data import ExecutionOptions, ExecutionResources

    ctx = ray.data.DataContext.get_current()
    cluster_cpus = ray.cluster_resources().get("CPU", 1.0) if ray.is_initialized() else None
    data_cpus = None
    if cluster_cpus is not None:
        data_cpus = max(1.0, cluster_cpus - num_workers * cpus_per_worker)
    limits = ExecutionResources.for_limits(
        cpu=data_cpus, object_store_memory=OBJECT_STORE_LIMIT_BYTES
    )
    ctx.execution_options.resource_limits = limits
    ctx.execution_options.preserve_order = preserve_order
    ctx.enable_progress_bars = False
    options = ExecutionOptions(resource_limits=limits, preserve_order=preserve_order)
    return ExactEvalDataConfig(datasets_to_split="all", execution_options=options)
