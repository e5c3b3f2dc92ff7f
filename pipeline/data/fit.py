"""The driver's one pass over the rows before Ray starts: dense statistics, row checks, and
each file's rows of each split (which plan the epochs: `pipeline.data.plan`).

`fit_preprocessor` streams once over every row of the dense, label, weight and split
columns (one 128k-row batch per thread at a time). It computes each dense feature's mean
and standard deviation over the train split, and it rejects, naming the file and the
column, what would otherwise fail later inside a Ray worker: NaN/inf dense values in any
split (unless `impute`), binary labels outside {0, 1} (also without footer statistics),
invalid sample weights, unreadable pages, and a label that is null in every row.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import DataConfig
from pipeline.data.files import (
    DECODE_ERRORS,
    Footer,
    InputFiles,
    corrupt_data,
    filesystem_for,
)
from pipeline.data.plan import SplitRows
from pipeline.data.preprocess import (
    DenseStats,
    Preprocessor,
    as_float,
    check_binary_labels,
    check_weights,
    elementwise,
)
from pipeline.data.split import split_counts, split_mask, split_names
from pipeline.errors import SchemaError
from pipeline.progress import progress

BATCH_ROWS = 131_072  # rows a pass holds per thread at a time


@dataclass
class _Moments:
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean

    def add(self, values: np.ndarray) -> None:
        """Chan et al.'s parallel update: numerically stable for any number of batches."""
        if len(values):
            mean = float(values.mean())
            self.merge(_Moments(len(values), mean, float(((values - mean) ** 2).sum())))

    def merge(self, other: _Moments) -> None:
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / total
        self.m2 += other.m2 + delta**2 * self.count * other.count / total
        self.count = total


def _check_rows(batch: pa.RecordBatch, data: DataConfig, file: str, observed: np.ndarray) -> None:
    """Fail on label and weight values a worker would reject; count observed labels."""
    names = set(batch.schema.names)
    for j, task in enumerate(data.tasks):
        if task.label_column not in names:  # `check_schema` requires it; unit tests may not
            observed[j] += batch.num_rows
            continue
        y = as_float(batch.column(task.label_column))
        observed[j] += int(np.isfinite(y).sum())
        check_binary_labels(y, task, file)
    if data.weight_column in names:
        check_weights(as_float(batch.column(data.weight_column)), data.weight_column, file)


def _check_labels_observed(data: DataConfig, observed: np.ndarray, rows: int) -> None:
    for task, count in zip(data.tasks, observed, strict=True):
        if rows and count == 0:
            raise SchemaError(
                f"data.path {data.path!r}: column {task.label_column!r} (label of task "
                f"{task.name!r}) is null in all {rows} rows"
            )


@dataclass
class _FilePass:
    """What one file's pass found: dense moments over its train rows, each row group's rows
    of each split, its observed labels per task, and its rows."""

    moments: dict[str, _Moments]
    splits: dict[str, list[int]]  # split -> rows per row group
    observed: np.ndarray
    rows: int = 0


def _file_pass(footer: Footer, data: DataConfig, fit: bool = True) -> _FilePass:
    """One file's rows: with `fit`, the checks and moments; always, the split counts (then
    only the split column is read)."""
    file = footer.file
    fs, fs_path = filesystem_for(file)
    groups = footer.metadata.num_row_groups
    found = _FilePass(
        {f.column: _Moments() for f in data.dense},
        {name: [0] * groups for name in split_names(data.split)},
        np.zeros(len(data.tasks), dtype=np.int64),
    )
    try:
        parquet = pq.ParquetFile(fs_path, filesystem=fs, metadata=footer.metadata)
        columns = [data.split.column]
        if fit:
            checked = [t.label_column for t in data.tasks] + [data.weight_column or ""]
            checked = [c for c in checked if c in parquet.schema_arrow.names]
            columns = [*(f.column for f in data.dense), data.split.column, *checked]
        for group, batch in _batches(parquet, list(dict.fromkeys(columns))):
            found.rows += batch.num_rows
            split_column = batch.column(data.split.column)
            for name, count in split_counts(split_column, data.split).items():
                found.splits[name][group] += count
            if not fit:
                continue
            _check_rows(batch, data, file, found.observed)
            keep = split_mask(split_column, data.split, "train")
            for f in data.dense:
                # Every row, not only train rows: a NaN in validation fails here, not later.
                values = elementwise(as_float(batch.column(f.column)), f, file)
                found.moments[f.column].add(values[keep])
    except DECODE_ERRORS as err:
        raise corrupt_data(file, err) from None
    return found


def _batches(parquet: pq.ParquetFile, columns: list[str]) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(row group, batch) of every row, at most `BATCH_ROWS` at a time."""
    for group in range(parquet.metadata.num_row_groups):
        for batch in parquet.iter_batches(BATCH_ROWS, row_groups=[group], columns=columns):
            yield group, batch


def _passes(data: DataConfig, files: InputFiles, fit: bool, desc: str) -> list[_FilePass]:
    """Every file's pass, four files at a time, with a progress bar."""
    out = []
    with (
        ThreadPoolExecutor(max_workers=max(1, min(4, len(files)))) as pool,
        progress(len(files), desc, "file") as bar,
    ):
        for found in pool.map(lambda footer: _file_pass(footer, data, fit), files.footers):
            out.append(found)
            bar.set_postfix_str(f"{sum(f.rows for f in out):,} rows", refresh=False)
            bar.update(1)
    return out


def _split_rows(files: InputFiles, passes: list[_FilePass]) -> SplitRows:
    names = list(passes[0].splits) if passes else []
    units = [(f.file, g) for f in files.footers for g in range(f.metadata.num_row_groups)]
    rows = {n: [count for found in passes for count in found.splits[n]] for n in names}
    return SplitRows(units, rows)


def count_split_rows(data: DataConfig, files: InputFiles) -> SplitRows:
    """The rows of each split in each file (the split column only): what a resumed run,
    whose preprocessing is its checkpoint's, needs to plan its epochs."""
    return _split_rows(files, _passes(data, files, fit=False, desc="counting rows"))


def fit(data: DataConfig, files: InputFiles) -> tuple[Preprocessor, SplitRows]:
    """Compute dense statistics in one streaming pass over the rows, checking every row,
    and count each file's rows of each split (`pipeline.data.plan`).

    Args:
        data: the `data:` section of the config.
        files: the files from `check_schema(data)`.

    Raises:
        SchemaError: naming the file and the column (see the module docstring).

    Example:
        >>> pre, counts = fit(cfg.data, check_schema(cfg.data))  # doctest: +SKIP
    """
    passes = _passes(data, files, fit=True, desc="checking rows")
    totals = {f.column: _Moments() for f in data.dense}
    observed = np.zeros(len(data.tasks), dtype=np.int64)
    for found in passes:
        observed += found.observed
        for column, m in found.moments.items():
            totals[column].merge(m)
    _check_labels_observed(data, observed, sum(f.rows for f in passes))
    counts = _split_rows(files, passes)
    if counts.total("train") == 0:
        raise SchemaError(
            f"data.path {data.path!r}: no rows fall in the train split "
            f"(split.method={data.split.method!r}, column {data.split.column!r})"
        )
    stats = {}
    for column, m in totals.items():
        std = float(np.sqrt(m.m2 / m.count)) if m.count else 1.0
        stats[column] = DenseStats(m.mean, std if std > 0 else 1.0, m.count)
    return Preprocessor(data, stats), counts


def fit_preprocessor(data: DataConfig, files: InputFiles) -> Preprocessor:
    """`fit`'s preprocessing alone (for callers that do not plan epochs)."""
    return fit(data, files)[0]
