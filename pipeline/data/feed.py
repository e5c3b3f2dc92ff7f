"""A train worker's batches: its rows of each epoch (`pipeline.data.plan`), streamed by Ray
Data or served from an epoch cache, shuffled, on the worker's device.

**Streaming.** Each worker reads its own ranges with a Ray Data dataset of its own: one item
per Parquet row group and its ranges in a row (`ray.data.from_items`), mapped by tasks
(`MapBatches(_read_unit)`) that read each row group with pyarrow, keep the rows of the split
and of the worker's range, and preprocess and pack them (`Layout.pack`: one float32 and one
int64 2-D tensor column), so a block reaches the worker as two zero-copy numpy arrays: no
per-column conversion, no re-batching by Ray. A worker whose budget runs one task at a time
reads a pass in one task (no pause between row groups); with more, the items are shared
among as many tasks as it may run at once (more where each would hold over its share of the
object-store window), and they run side by side. A row group read for ranges of several
splits in a row (logs split by a hash or a column's values hold rows of every split in a row
group) is decoded once, and each of its batches has its split column hashed once and its
rows preprocessed in one call for all those ranges. The split column is read only where some
range needs its mask (a row group's rows not all of the range's split), as its dictionary
where that is small. The worker takes each block as it comes (no prefetch: Ray's holds a
block back until two more are read). (Ray Data's `read_parquet` is not used here: it samples
files with tasks that reserve a whole CPU, which a node whose CPUs the train workers hold in
halves never has, and it reads whole files.) The dataset keeps the items' order
(`preserve_order`), so a worker's stream, and any position in it, is the same in every run.
The worker gathers the rows into chunks of `CHUNK_BATCHES` batches, permutes each chunk's
rows (a generator seeded by seed, epoch, rank and chunk), and cuts the chunk into batches;
with the per-epoch order of the row groups that is the shuffle.

**Positions.** A worker's epoch is a fixed sequence of batches; resuming at batch k reads
from the chunk that holds it (its row groups before are not read again) and drops the
k mod `CHUNK_BATCHES` batches of that chunk the run already took: no row is trained twice.

**Epoch cache** (`data.cache`). When the worker's rows of the train and validation splits
fit the budget, the first pass keeps them where the step reads them: GPU memory on a GPU
(`device`), else host memory (`host`, pinned for a GPU), and with them the test split's when
all three fit. The rows are read into it in one stream before the first epoch's first step,
at the stream's full speed, each row group once for all its splits' rows (each range put at
its place in its split's cache); every epoch, the first too, permutes the cached train rows
with a seeded permutation on the device, and validation (and the final test pass) read their
rows again; Ray Data is not touched. `auto` chooses device, then host, and streams what fits
neither. A resumed run fills the cache again from the same rows, in the same order.

Budgets come from the node: each worker's dataset gets its share of the CPUs the train
workers leave, and an object-store window of two blocks per task it may run (at least
four blocks).
"""

from __future__ import annotations

import itertools
import math
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import DataConfig
from pipeline.data.collate import FLOAT, Layout, Packed, Prefetcher
from pipeline.data.ingest import DATA_TASK_CPUS
from pipeline.data.plan import EpochPlan, Range, SplitRows
from pipeline.data.preprocess import Preprocessor
from pipeline.data.split import split_masks

CHUNK_BATCHES = 8  # the shuffle permutes rows among this many batches of a stream
READ_AHEAD_BLOCKS = 2  # object-store window per read task a worker's dataset may run


READ_BATCH_ROWS = 131_072  # rows a read task holds at a time (one output block each)


def _read_unit(
    items: dict[str, np.ndarray], preprocessor: Preprocessor, layout: Layout
) -> Iterator[pa.Table]:
    """Ray Data's map over a block of items (each a row group and ranges of its rows of
    one or more splits, `unit_items`), in order: each range's raw rows, preprocessed and
    packed, in blocks of at most `READ_BATCH_ROWS` rows."""
    data = preprocessor.data
    columns = data.columns(labels=True)  # what the preprocessing reads
    masked_columns = data.columns(labels=True, split=True)
    dictionary = dictionary_candidates(data)
    for (path, group), run in itertools.groupby(_items(items), key=lambda item: item[1:3]):
        # Ranges in a row of one row group (its rows of several splits, as in logs split by
        # a hash or by a column's values) share one decode. The first range's rows go out as
        # they are read; the others', preprocessed and packed, are held until it ends (a
        # row group's rows of the later splits, not its every decoded batch).
        unit = _open_row_group(path, group, dictionary)
        # A range whose row group holds only its split's rows (a day of logs split by
        # day, as the driver's count says) needs no mask: 4 % of the reading (1M synthetic
        # rows in one process: 0.364 -> 0.349 CPU-s), and where no range needs one, the
        # split column is not read (a day column as text: a quarter of the synthetic
        # logs' Parquet decoding). The others' masks come from one pass over the split
        # column per batch.
        ranges = [_Rows(start, stop, None if unit_rows == unit.rows else split)
                  for split, _, _, start, stop, unit_rows in run]  # fmt: skip
        decoded = unit.batches(masked_columns if any(r.split for r in ranges) else columns)
        held: list[list[pa.Table]] = [[] for _ in ranges]
        for batch in decoded:
            masked = sorted({r.split for r in ranges if r.split and not r.done})
            masks = {}
            if masked:
                masks = split_masks(batch.column(data.split.column), data.split, masked)
            picks = [r.pick(batch.num_rows, masks) for r in ranges]
            for i, packed in enumerate(_transformed(batch, picks, preprocessor, layout)):
                if packed is not None:
                    table = _packed_table(packed)
                    if i:
                        held[i].append(table)
                    else:
                        yield table
            if all(r.done for r in ranges):
                break
        for tables in held[1:]:
            yield from tables


def _read_packed(items: dict[str, np.ndarray], layout: Layout) -> Iterator[pa.Table]:
    """Ray Data's map over a block of items of a search's preprocessed copy: the ranges as
    they are."""
    blocks = [b for b, _ in layout.blocks]
    for _, path, group, start, stop, _ in _items(items):
        rows = _Rows(start, stop, None)
        for batch in _open_row_group(path, group, []).batches(blocks):
            picked = rows.pick(batch.num_rows, {})
            if picked is not None:
                taken = _rows_of(batch, picked)
                yield _packed_table({k: _tensor(taken.column(k)) for k in blocks})
            if rows.done:
                break


RANGE_FIELDS = ("split", "start", "stop", "unit_rows")  # an item's lists, one entry a range


def _items(items: dict[str, np.ndarray]) -> Iterator[tuple[str, str, int, int, int, int]]:
    """(split, path, row group, start, stop, unit rows) of each range of each item (a row
    group and its ranges, `unit_items`), in order."""
    for i in range(len(items["path"])):
        path, group = str(items["path"][i]), int(items["row_group"][i])
        for split, start, stop, unit_rows in zip(
            *(items[key][i] for key in RANGE_FIELDS), strict=True
        ):
            yield str(split), path, group, int(start), int(stop), int(unit_rows)


class _Rows:
    """Rows [start, stop) of a row group's rows of `split` (all its rows when None), picked
    one decoded batch at a time."""

    def __init__(self, start: int, stop: int, split: str | None) -> None:
        self.start, self.stop, self.split, self.seen = start, stop, split, 0

    @property
    def done(self) -> bool:
        return self.seen >= self.stop

    def pick(self, rows: int, masks: dict[str, np.ndarray]) -> np.ndarray | None:
        """The positions, in a batch of `rows` rows, of the range's rows in it (in order),
        or None; `masks`: the batch's rows of each split (`split_masks`)."""
        if self.done:
            return None
        where = np.arange(rows) if self.split is None else np.flatnonzero(masks[self.split])
        lo, hi = max(self.start - self.seen, 0), min(self.stop - self.seen, len(where))
        self.seen += len(where)
        return where[lo:hi] if lo < hi else None


def _rows_of(batch: pa.RecordBatch, positions: np.ndarray) -> pa.RecordBatch:
    """The batch's rows at `positions` (ascending): a zero-copy slice when they are one
    run, as a row group of one split's rows gives."""
    first, count = int(positions[0]), len(positions)
    if int(positions[-1]) - first + 1 == count:
        return batch.slice(first, count)
    return batch.take(pa.array(positions))


def _transformed(
    batch: pa.RecordBatch,
    picks: list[np.ndarray | None],
    preprocessor: Preprocessor,
    layout: Layout,
) -> list[Packed | None]:
    """Each pick's rows of `batch` (`_Rows.pick`), preprocessed and packed: the rows of all
    the picks, one pick after the other, are preprocessed in one call and each pick's are
    a slice of the result (a row group of logs split by a hash holds rows of every split;
    one call instead of one per split saves its per-column costs, over 200 columns on a
    production-width log)."""
    chosen = [p for p in picks if p is not None]
    if not chosen:
        return [None] * len(picks)
    every = np.concatenate(chosen)
    if len(chosen) == 1 or bool((np.diff(every) > 0).all()):
        rows = _rows_of(batch, every)
    else:  # the picks' rows interleave in the batch (rows of several splits)
        rows = batch.take(pa.array(every))
    packed = layout.pack(preprocessor.transform(rows))
    out: list[Packed | None] = []
    at = 0
    for p in picks:
        out.append(None if p is None else {k: v[at : at + len(p)] for k, v in packed.items()})
        at += 0 if p is None else len(p)
    return out


def _packed_table(arrays: dict[str, Any]) -> pa.Table:
    from ray.data.extensions import ArrowTensorArray

    return pa.table(
        {k: ArrowTensorArray.from_numpy(v if isinstance(v, np.ndarray) else v.numpy())
         for k, v in arrays.items()}
    )  # fmt: skip


# A string column is read as its Parquet dictionary when its column chunk holds at most this
# many bytes per value (see `dictionary_columns`).
DICTIONARY_BYTES_PER_VALUE = 2


def hashed_columns(data: DataConfig) -> list[str]:
    """The columns the preprocessing only hashes: categorical features and GAUC group keys."""
    return list(dict.fromkeys([f.column for f in data.categorical] + list(data.group_columns)))


def dictionary_candidates(data: DataConfig) -> list[str]:
    """The columns read as their Parquet dictionary where it is small
    (`dictionary_columns`): those the preprocessing only hashes, and the split column,
    whose masks `split_masks` finds from the dictionary's entries (a day as text: the
    synthetic logs' Parquet decoding 0.077 -> 0.062 CPU-s per 1M rows)."""
    return list(dict.fromkeys([*hashed_columns(data), data.split.column]))


def dictionary_columns(
    metadata: pq.FileMetaData, row_groups: list[int], candidates: list[str]
) -> list[str]:
    """The string columns of `candidates` to read from these row groups as their Parquet
    dictionary: Arrow then hands over the dictionary and each row's index into it, which
    `hashing.Hashed` hashes as they are, instead of making every row's string and finding
    the distinct values again (the Census files: the read 0.25 -> 0.06 CPU-s, the
    preprocessing 0.26 -> 0.07 per 299k rows).

    Only where every chunk has a dictionary page and at most `DICTIONARY_BYTES_PER_VALUE`
    bytes per non-null value: the data pages then hold indices into a small dictionary. A
    writer whose dictionary outgrew its limit falls back to plain pages (4 bytes or more per
    value), which Arrow would turn into a dictionary growing batch by batch over the row
    group (1M distinct ids: a read 5 times slower); those columns are read as text.

    Example:
        >>> import io, pyarrow as pa
        >>> sink = io.BytesIO()
        >>> pq.write_table(pa.table({"c": ["a", "b"] * 50, "n": list(range(100))}), sink)
        >>> dictionary_columns(pq.read_metadata(sink), [0], ["c", "n"])
        ['c']
    """
    leaves = {metadata.schema.column(i).path: i for i in range(metadata.num_columns)}
    chosen = []
    for name in candidates:
        if name not in leaves:  # absent, or nested (a list's values)
            continue
        chunks = [metadata.row_group(g).column(leaves[name]) for g in row_groups]
        if chunks and all(_small_dictionary(c) for c in chunks):
            chosen.append(name)
    return chosen


def _small_dictionary(chunk: Any) -> bool:
    if chunk.physical_type != "BYTE_ARRAY" or not chunk.has_dictionary_page:
        return False
    values = chunk.num_values
    if chunk.is_stats_set and chunk.statistics.has_null_count:
        values -= chunk.statistics.null_count
    return chunk.total_uncompressed_size <= DICTIONARY_BYTES_PER_VALUE * max(values, 1)


def open_parquet(
    source: Any, candidates: list[str], row_groups: list[int] | None = None
) -> pq.ParquetFile:
    """A Parquet file (a path or an open file) to read `row_groups` of (all when None): its
    string columns of `candidates` (`dictionary_candidates`) as their dictionary where
    `dictionary_columns` says so, the footer read once."""
    parquet = pq.ParquetFile(source)
    if row_groups is None:
        row_groups = list(range(parquet.metadata.num_row_groups))
    dictionary = dictionary_columns(parquet.metadata, row_groups, candidates)
    if not dictionary:
        return parquet
    return pq.ParquetFile(source, metadata=parquet.metadata, read_dictionary=dictionary)


@dataclass(frozen=True)
class _RowGroup:
    """An open row group of a Parquet file: its rows, and its columns read in batches."""

    path: str
    group: int
    parquet: pq.ParquetFile
    rows: int

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """Its rows' `columns`, `READ_BATCH_ROWS` rows at a time; a file that cannot be
        decoded is named in the error."""
        from pipeline.data.files import DECODE_ERRORS, corrupt_data

        try:
            yield from self.parquet.iter_batches(
                READ_BATCH_ROWS, row_groups=[self.group], columns=columns, use_threads=False
            )
        except DECODE_ERRORS as err:
            raise corrupt_data(self.path, err) from None


def _open_row_group(path: str, group: int, dictionary: list[str]) -> _RowGroup:
    """A row group, its `dictionary` string columns (`dictionary_candidates`) to be read
    as their dictionary where `dictionary_columns` says so; a file that cannot be opened is
    named in the error."""
    from pipeline.data.files import DECODE_ERRORS, corrupt_data, filesystem_for

    fs, fs_path = filesystem_for(path)
    try:
        parquet = open_parquet(fs.open_input_file(fs_path), dictionary, [group])
        return _RowGroup(path, group, parquet, parquet.metadata.row_group(group).num_rows)
    except DECODE_ERRORS as err:
        raise corrupt_data(path, err) from None


def _tensor(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A packed column as Ray Data writes it (its tensor extension type, or the fixed-size
    lists under it when the type is not registered) as a 2-D array."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array, pa.ExtensionArray):
        if hasattr(array, "to_numpy") and type(array) is not pa.ExtensionArray:
            return array.to_numpy()
        array = array.storage
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(array), -1)


@dataclass(frozen=True)
class Budget:
    """What one worker's dataset may use of the node.

    Attributes:
        cpus: CPUs its read-and-preprocess tasks may hold at once.
        task_cpus: CPUs each such task reserves.
        object_store_bytes: blocks it may keep in the object store at once.
        block_bytes: the size a task's packed rows are gathered into blocks of.
    """

    cpus: float
    task_cpus: float
    object_store_bytes: int
    block_bytes: int

    @property
    def tasks(self) -> int:
        """Read tasks it may run at once."""
        return _tasks_in(self.cpus, self.task_cpus)

    def tasks_for(self, items: int, nbytes: int) -> int:
        """The tasks a pass of `items` items (row groups, `unit_items`) holding `nbytes`
        packed bytes is read in, each a run of consecutive items: one where the budget runs
        one task at a time (a stream with no pause between row groups); else as many as it
        may run at once, and more where each would hold over its share of the object-store
        window, at most one per item. Where there are more items than tasks, consecutive
        items share a task: each task costs tens of milliseconds to start, and the 14 row
        groups of 1M synthetic rows read in 14 tasks by one worker holding 1.5 CPUs ran at
        1.42M-1.46M rows/s, in 4 at 1.75M-2.02M.

        Example:
            >>> budget = Budget.of(2.0, 1, 0.5, 16 * 2**20)  # 3 tasks, a 32 MiB share each
            >>> budget.tasks_for(14, 108_000_000), budget.tasks_for(14, 10**6)
            (4, 3)
            >>> budget.tasks_for(2, 10**9), Budget.of(2.0, 2, 0.5, 16 * 2**20).tasks_for(14, 10**9)
            (2, 1)
        """
        if self.tasks == 1:
            return 1
        share = self.object_store_bytes / self.tasks
        return max(1, min(items, max(self.tasks, math.ceil(nbytes / share))))

    @classmethod
    def of(
        cls, cluster_cpus: float, workers: int, cpus_per_worker: float, block_bytes: int
    ) -> Budget:
        """Each worker's share of the CPUs the workers leave (at least one task's), and two
        blocks of `block_bytes` in the object store per task it can run (at least four).

        Example:
            >>> Budget.of(2.0, 2, 0.5, 16 * 2**20)  # the 2-CPU machine: 64 MiB each
            Budget(cpus=0.5, task_cpus=0.5, object_store_bytes=67108864, block_bytes=16777216)
            >>> Budget.of(16.0, 2, 1.0, 16 * 2**20).object_store_bytes // 2**20
            448
        """
        task_cpus = DATA_TASK_CPUS
        cpus = max(task_cpus, (cluster_cpus - workers * cpus_per_worker) / max(workers, 1))
        window = max(4, _tasks_in(cpus, task_cpus) * READ_AHEAD_BLOCKS) * block_bytes
        return cls(cpus, task_cpus, window, block_bytes)


def _tasks_in(cpus: float, task_cpus: float) -> int:
    return max(1, math.floor(cpus / task_cpus + 1e-9))


Part = tuple[str, list[Range]]  # a split and ranges of its rows


def unit_items(parts: list[Part]) -> list[dict[str, Any]]:
    """Ray Data's items for the ranges of `parts`, in order: one item per run of ranges in
    one row group (its rows of several splits, read in a row), so that one task decodes the
    row group once for all of them.

    Example:
        >>> a, b = Range("f", 0, 0, 9, 9), Range("f", 0, 0, 1, 1)
        >>> [(i["row_group"], list(i["split"])) for i in unit_items([("train", [a]), ("test", [b])])]
        [(0, ['train', 'test'])]
    """
    items: list[dict[str, Any]] = []
    for split, ranges in parts:
        for r in ranges:
            if not items or (items[-1]["path"], items[-1]["row_group"]) != (r.path, r.row_group):
                items.append({"path": r.path, "row_group": r.row_group}
                             | {key: [] for key in RANGE_FIELDS})  # fmt: skip
            for key, value in zip(RANGE_FIELDS, (split, r.start, r.stop, r.unit_rows), strict=True):
                items[-1][key].append(value)
    return items


def by_row_group(parts: list[Part]) -> list[tuple[str, Range, int]]:
    """The ranges of `parts` with those of one row group in a row (in the order each row
    group first comes), each with its place among its split's rows: (split, range, offset).
    A pass over them decodes each row group once for every split it holds rows of (logs
    split by a hash hold rows of every split in every row group).

    Example:
        >>> a, b, c = Range("a", 0, 0, 5, 5), Range("b", 0, 0, 2, 2), Range("a", 0, 0, 1, 1)
        >>> [(s, r.path, at) for s, r, at in by_row_group([("train", [a, b]), ("test", [c])])]
        [('train', 'a', 0), ('test', 'a', 0), ('train', 'b', 5)]
    """
    placed, first = [], {}
    for split, ranges in parts:
        offset = 0
        for r in ranges:
            first.setdefault((r.path, r.row_group), len(first))
            placed.append((split, r, offset))
            offset += r.rows
    return sorted(placed, key=lambda p: first[(p[1].path, p[1].row_group)])


def read_units(
    parts: list[Part],
    preprocessor: Preprocessor,
    layout: Layout,
    task_cpus: float,
    tasks: int | None = None,
) -> Any:
    """A lazy Ray Data dataset of the rows of the ranges of each (split, ranges) part,
    preprocessed and packed (read as they are from a search's `packed` copy), in order:
    `tasks` tasks (each a run of consecutive items), one per item (`unit_items`) when
    None."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    items = unit_items(parts)
    tasks = len(items) if tasks is None else max(1, min(tasks, len(items)))
    ds = ray.data.from_items(items, override_num_blocks=tasks)
    if any(r.packed for _, ranges in parts for r in ranges):
        reader, kwargs = _read_packed, {"layout": layout}
    else:
        reader, kwargs = _read_unit, {"preprocessor": preprocessor, "layout": layout}
    return ds.map_batches(  # batch_size None: a task's whole block of items
        reader, batch_size=None, batch_format="numpy", num_cpus=task_cpus, fn_kwargs=kwargs
    )


def stream_ranges(
    parts: list[Part], preprocessor: Preprocessor, layout: Layout, budget: Budget
) -> Iterator[Packed]:
    """The rows of the ranges of each (split, ranges) part, in order, as packed numpy
    blocks (a block may hold rows of two parts).

    A dataset that may run one task at a time reads all the ranges in that one task, a
    stream with no pause between row groups (each new task costs tens of milliseconds to
    start); with more, the row groups are shared among as many tasks as it may run at once,
    or more where each would hold over its share of the object-store window
    (`Budget.tasks_for`), and they run side by side (a row group's run of ranges read in one
    task, decoded once for them all).
    """
    if not any(ranges for _, ranges in parts):
        return
    rows = sum(r.rows for _, ranges in parts for r in ranges)
    tasks = budget.tasks_for(len(unit_items(parts)), rows * layout.row_bytes())
    ds = read_units(parts, preprocessor, layout, budget.task_cpus, tasks)
    # A task's packed tables are gathered into blocks of this size (Ray's default, 128 MiB,
    # would hand a worker its whole share of a one-task pass as one block, at the end).
    ds.context.target_max_block_size = budget.block_bytes
    options = ds.context.execution_options
    options.preserve_order = True  # the ranges' order: positions are the same every run
    options.resource_limits = options.resource_limits.copy(
        cpu=budget.cpus, object_store_memory=budget.object_store_bytes
    )
    # No prefetch: Ray's prefetch holds each block back until two more are read. A block
    # gathers several of a task's tables; each is taken as it is (zero-copy numpy views),
    # since Ray's numpy format would concatenate them first, a copy the worker never needs.
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        for batch in block.to_batches():
            if batch.num_rows:
                yield {name: _tensor(batch.column(name)) for name in batch.schema.names}


def _chunks(blocks: Iterator[Packed], rows: int) -> Iterator[Packed]:
    """Chunks of exactly `rows` rows (the last may be short) out of blocks of any size: views
    of a block when the chunk lies in one, else a concatenated copy. Views are read-only
    (Ray's store): `_torch` copies them, permuted or not."""
    pending: list[Packed] = []
    held = 0
    for block in blocks:
        pending.append(block)
        held += len(block[FLOAT])
        while held >= rows:
            yield _take(pending, rows)
            pending, held = _rest(pending, rows)
    if held:
        yield _take(pending, held)


def _take(blocks: list[Packed], rows: int) -> Packed:
    """The first `rows` rows of `blocks`: views of the first block when it holds them."""
    if len(blocks[0][FLOAT]) >= rows:
        return {k: v[:rows] for k, v in blocks[0].items()}
    out = {}
    for key in blocks[0]:
        parts, left = [], rows
        for block in blocks:
            part = block[key][:left]
            parts.append(part)
            left -= len(part)
            if not left:
                break
        out[key] = np.concatenate(parts)
    return out


def _rest(blocks: list[Packed], rows: int) -> tuple[list[Packed], int]:
    """`blocks` without their first `rows` rows, and the rows left."""
    out, left = [], rows
    for block in blocks:
        size = len(block[FLOAT])
        if left >= size:
            left -= size
            continue
        out.append({k: v[left:] for k, v in block.items()})
        left = 0
    return out, sum(len(b[FLOAT]) for b in out)


def permutation_seed(seed: int, epoch: int, rank: int, chunk: int) -> int:
    """The seed of one permutation of a worker's rows (a streamed chunk's, or with `chunk`
    -1 a cached epoch's): the same in every run."""
    return (((seed * 1_000_003 + epoch) * 1_009 + rank) * 1_000_033 + chunk + 1) % 2**63


def _torch(chunk: Packed, order: np.ndarray | None, pin: bool) -> dict[str, torch.Tensor]:
    """A chunk's arrays as tensors of their own (one copy: permuted by `order`, or plain),
    written straight into pinned memory for a GPU."""
    out = {}
    for key, value in chunk.items():
        target = torch.empty(value.shape, dtype=_TORCH[value.dtype.str], pin_memory=pin)
        if order is None:
            target.numpy()[...] = value
        else:
            np.take(value, order, axis=0, out=target.numpy())
        out[key] = target
    return out


_TORCH = {np.dtype(np.float32).str: torch.float32, np.dtype(np.int64).str: torch.int64}


def _cut_batches(
    chunk: dict[str, torch.Tensor], batch_size: int, skip: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    rows = len(chunk[FLOAT])
    for start in range(skip * batch_size, rows, batch_size):
        yield {k: v[start : start + batch_size] for k, v in chunk.items()}


def _gather(tensors: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The `rows` of each tensor, in their order, as new tensors. On the host through
    numpy's `take`: a cached epoch of 430k synthetic rows gathered in 17 ms against torch's
    `index_select`'s 25 ms, one thread each (rows of 52 and 56 bytes)."""
    if rows.device.type != "cpu":
        return {k: v.index_select(0, rows) for k, v in tensors.items()}
    index = rows.numpy()
    return {k: torch.from_numpy(np.take(v.numpy(), index, axis=0)) for k, v in tensors.items()}


@dataclass(frozen=True)
class CacheChoice:
    """Where a worker keeps its rows, and why.

    Attributes:
        where: "device", "host" or "off" (streams every epoch).
        bytes: what the rows take.
        budget: what the chosen place allows (0 for off).
    """

    where: str
    bytes: int
    budget: int


def choose_cache(
    mode: str, need: int, device: torch.device, device_budget: int, host_budget: int
) -> CacheChoice:
    """Where `need` bytes of a worker's rows go under `data.cache` = `mode`: `device`
    (GPU memory, on a GPU), `host`, or off; `auto` takes the first that fits. A place whose
    budget the rows exceed is not taken: they stream.

    Example:
        >>> cpu = torch.device("cpu")
        >>> choose_cache("auto", 10, cpu, 0, 100).where, choose_cache("auto", 1000, cpu, 0, 100).where
        ('host', 'off')
    """
    on_gpu = device.type == "cuda"
    places = {
        "device": [("device", device_budget)] if on_gpu else [("host", host_budget)],
        "host": [("host", host_budget)],
        "auto": ([("device", device_budget)] if on_gpu else []) + [("host", host_budget)],
    }
    for where, budget in places.get(mode, []):
        if need <= budget:
            return CacheChoice(where, need, budget)
    return CacheChoice("off", need, 0)


def _empty(
    shape: tuple[int, int], dtype: torch.dtype, device: torch.device, pin: bool
) -> torch.Tensor:
    """An uninitialised tensor. Host memory that is not pinned is mapped with its pages
    populated at once (`MAP_POPULATE`): the cache is written once, in its first pass, and
    the kernel filling the pages in one call costs less than a fault per 4 KiB page. A
    worker's 26 MB (500k synthetic rows) filled in 10-11 ms, against 14-16 ms into
    `torch.empty`'s memory; advised for transparent huge pages (`madvise`, before) it took
    4-5 ms where the kernel had huge pages at hand and 21-56 ms where it had not, which made
    a run's first fill, into memory never used before, the slowest."""
    count = math.prod(shape)
    if device.type != "cpu" or pin or not count or not hasattr(mmap, "MAP_POPULATE"):
        return torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
    buffer = mmap.mmap(-1, count * dtype.itemsize, flags=flags)
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)


class RowCache:
    """A worker's rows of one split, kept for later epochs: one tensor per dtype, each row
    at its place in the split's stream."""

    def __init__(self, layout: Layout, rows: int, device: torch.device, pin: bool) -> None:
        self.rows, self.filled = rows, 0
        self.tensors = {}
        for block, widths in layout.blocks:
            width = sum(max(w, 1) for _, w in widths)
            dtype = torch.float32 if block == FLOAT else torch.int64
            self.tensors[block] = _empty((rows, width), dtype, device, pin)

    @property
    def full(self) -> bool:
        return self.filled == self.rows

    def put(self, at: int, chunk: Packed) -> None:
        """Write a chunk (numpy arrays, as streamed) at row `at`, in one copy."""
        size = len(chunk[FLOAT])
        lo, hi = at, at + size
        on_host = self.tensors[FLOAT].device.type == "cpu"
        source = chunk if on_host else _torch(chunk, None, pin=True)
        for key, tensor in self.tensors.items():
            if on_host:
                tensor[lo:hi].numpy()[...] = source[key]
            else:
                tensor[lo:hi].copy_(source[key], non_blocking=True)
        self.filled += size

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


# The splits a cache keeps, in the order one pass reads them. The test split, read once at
# the end of a run, is kept when all three fit the budget (`WorkerFeed.keep_what_fits`):
# the run then reads its logs in one pass, and its test pass starts no Ray Data execution
# of its own (each costs ~70 ms: a 36k-row test share took 0.09-0.15 s of a 1M-row first
# epoch).
CACHED_SPLITS = ("train", "validation", "test")


class WorkerFeed:
    """This worker's batches of every split and epoch (see the module docstring).

    Args:
        counts: each file's rows of each split (`fit` or `count_split_rows`).
        preprocessor: the run's preprocessing (the batches' layout).
        rank, world: this worker and the number of workers.
        device: where the batches go.
        seed: the run's seed (file order, chunk permutations, cached permutations).
        budget: this worker's share of the node for its datasets.
        cache: where the rows are kept: "device", "host" (`choose_cache`), or "off"; with
            the splits it keeps, `keep_what_fits` sets it from the budgets.
    """

    def __init__(
        self,
        counts: SplitRows,
        preprocessor: Preprocessor,
        rank: int,
        world: int,
        device: torch.device,
        seed: int,
        budget: Budget,
        cache: str = "off",
    ) -> None:
        self.counts, self.preprocessor = counts, preprocessor
        self.layout = Layout.of(preprocessor.empty())
        self.rank, self.world, self.device, self.seed = rank, world, device, seed
        self.budget, self.cache, self.keep = budget, cache, CACHED_SPLITS
        self.pin = device.type == "cuda"
        self.cached: dict[str, RowCache] = {}

    def plan(self, split: str, epoch: int) -> EpochPlan:
        """The epoch's plan of `split`: the train split's file order changes every epoch,
        the others are read as given."""
        shuffle = split == "train"
        return EpochPlan.of(
            self.counts, split, self.world, self.seed, epoch if shuffle else 0, shuffle
        )

    def rows(self, split: str) -> int:
        """This worker's rows of `split` in an epoch (the same in every epoch)."""
        return self.plan(split, 1).worker_rows(self.rank)

    def cache_bytes(self, splits: tuple[str, ...]) -> int:
        """What this worker's rows of `splits` take, packed."""
        return sum(self.rows(s) for s in splits if s in self.counts.rows) * self.layout.row_bytes()

    def keep_what_fits(self, mode: str, device_budget: int, host_budget: int) -> CacheChoice:
        """Where the cache goes under `data.cache` = `mode` (`choose_cache`), and what it
        keeps: every split of `CACHED_SPLITS` when they fit, else the train and validation
        splits (the test split then streams at the end)."""
        for keep in (CACHED_SPLITS, CACHED_SPLITS[:2]):
            need = self.cache_bytes(keep)
            choice = choose_cache(mode, need, self.device, device_budget, host_budget)
            if choice.where != "off":
                break
        self.cache, self.keep = choice.where, keep
        return choice

    def batches_per_epoch(self, batch_size: int) -> int:
        """The train batches of an epoch: the same on every worker."""
        return math.ceil(self.rows("train") / batch_size)

    def cache_hit(self, split: str = "train") -> bool:
        """Whether the next pass over `split` reads the cache."""
        cache = self.cached.get(split)
        return cache is not None and cache.full

    def train(
        self, epoch: int, batch_size: int, start: int = 0
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The epoch's shuffled train batches on the device, from batch `start` on."""
        if self.cache != "off" and not self.cache_hit():
            self._fill([s for s in self.keep if s in self.counts.rows and s not in self.cached])
        if self.cache_hit():
            return self._unpacked(self._from_cache(epoch, batch_size, start))
        return self._unpacked(self._streamed(epoch, batch_size, start))

    def evaluation(self, split: str, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Every row of this worker's share of `split`, in order, on the device."""
        if self.cache != "off" and split in self.keep and split not in self.cached:
            self._fill([split])
        if self.cache_hit(split):
            return self._unpacked(_cut_batches(self.cached[split].tensors, batch_size))
        return self._unpacked(self._streamed_eval(split, batch_size))

    def _unpacked(self, batches: Iterator[dict]) -> Iterator[dict[str, torch.Tensor]]:
        return (self.layout.unpack(b) for b in Prefetcher(batches, self.device))

    def _ranges(self, split: str, epoch: int, skip_rows: int = 0) -> list[Range]:
        """The worker's ranges of `split` in `epoch`, from `skip_rows` rows into its share."""
        ranges = self.plan(split, epoch).ranges(self.rank, skip_rows)
        return [r.as_packed() for r in ranges] if self.counts.packed else ranges

    def _stream(self, split: str, epoch: int, skip_rows: int = 0) -> Iterator[Packed]:
        """The worker's rows of `split` in `epoch`, from `skip_rows` rows into its share."""
        parts = [(split, self._ranges(split, epoch, skip_rows))]
        return stream_ranges(parts, self.preprocessor, self.layout, self.budget)

    def _new_cache(self, split: str) -> RowCache:
        on_device = self.cache == "device"
        where = self.device if on_device else torch.device("cpu")
        cache = RowCache(self.layout, self.rows(split), where, self.pin and not on_device)
        self.cached[split] = cache
        return cache

    def _fill(self, splits: list[str]) -> None:
        """The caches of `splits` take this worker's rows of each (the train split's of
        epoch 1), each row at its place in its split's stream, in one pass before the first
        step; every epoch, the first too, then permutes the train cache. A resumed run fills
        them from the same rows, so its epochs permute the same cache as the first run's.
        (Filled beside the steps instead, the stream ran ahead of a CPU step and Ray Data's
        executor spun on its full window: the demo's first epoch ran at half the cached
        epochs' samples/s. One pass for all the splits starts Ray Data once.) The pass reads
        the ranges of one row group in a row (`by_row_group`), so a row group holding rows
        of several splits is decoded once."""
        caches = {split: self._new_cache(split) for split in splits}
        placed = by_row_group([(split, self._ranges(split, 1)) for split in splits])
        stream = stream_ranges(
            [(split, [r]) for split, r, _ in placed], self.preprocessor, self.layout, self.budget
        )
        targets = ((caches[split], at, r.rows) for split, r, at in placed)
        cache, at, left = None, 0, 0
        for block in stream:
            while len(block[FLOAT]):  # a block may end one range's rows and begin the next's
                if not left:
                    cache, at, left = next(targets, (None, 0, 0))
                    if cache is None:
                        break  # more rows than counted: the files changed; `cache_hit` decides
                size = min(left, len(block[FLOAT]))
                cache.put(at, {k: v[:size] for k, v in block.items()})
                block = {k: v[size:] for k, v in block.items()}
                at, left = at + size, left - size

    def _streamed(self, epoch: int, batch_size: int, start: int) -> Iterator[dict]:
        chunk_rows = CHUNK_BATCHES * batch_size
        first_chunk, skip = divmod(start, CHUNK_BATCHES)
        stream = self._stream("train", epoch, first_chunk * chunk_rows)
        for index, chunk in enumerate(_chunks(stream, chunk_rows), start=first_chunk):
            generator = np.random.default_rng(permutation_seed(self.seed, epoch, self.rank, index))
            order = generator.permutation(len(chunk[FLOAT]))
            tensors = _torch(chunk, order, self.pin)
            yield from _cut_batches(tensors, batch_size, skip if index == first_chunk else 0)

    def _from_cache(self, epoch: int, batch_size: int, start: int) -> Iterator[dict]:
        cache = self.cached["train"]
        where = cache.tensors[FLOAT].device
        generator = torch.Generator(device=where)
        generator.manual_seed(permutation_seed(self.seed, epoch, self.rank, -1))
        order = torch.randperm(cache.rows, generator=generator, device=where)
        for begin in range(start * batch_size, cache.rows, batch_size):
            yield _gather(cache.tensors, order[begin : begin + batch_size])

    def _streamed_eval(self, split: str, batch_size: int) -> Iterator[dict]:
        for chunk in _chunks(self._stream(split, 0), batch_size):
            yield _torch(chunk, None, self.pin)
