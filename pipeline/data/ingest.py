"""Ray Data reads of whole Parquet files for scoring (`predict`, `evaluate`) through
`read_files`; a file Ray cannot decode is named in the error (`naming_corrupt_files`).
Training reads row groups with its own tasks (`pipeline.data.feed`), which reserve
`DATA_TASK_CPUS` each and count the object store in blocks of `READ_BLOCK_BYTES`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import ray.data

from pipeline.data.files import DECODE_ERRORS, first_unreadable

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


def read_files(files: list[str], columns: list[str], task_cpus: float = DATA_TASK_CPUS) -> Any:
    """A lazy Ray Data read of `columns` of `files`: one task each (reserving `task_cpus`),
    bounded blocks, Ray's V1 Parquet reader (`_read_settings`), no progress bars."""
    with _read_settings():
        ray.data.DataContext.get_current().enable_progress_bars = False
        return ray.data.read_parquet(
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
            file_extensions=None,  # check_schema already chose the files
            # Columns come from the files: a `day=...` folder is a name, not a column.
            partitioning=None,
            num_cpus=task_cpus,
        )


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
