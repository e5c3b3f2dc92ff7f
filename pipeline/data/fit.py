"""The driver's one pass over the rows before Ray starts: dense statistics and row checks.

`fit_preprocessor` streams once over every row of the dense, label, weight and split
columns (one 128k-row batch per thread at a time). It computes each dense feature's mean
and standard deviation over the train split, and it rejects, naming the file and the
column, what would otherwise fail later inside a Ray worker: NaN/inf dense values in any
split (unless `impute`), binary labels outside {0, 1} (also without footer statistics),
invalid sample weights, unreadable pages, and a label that is null in every row.
"""

from __future__ import annotations

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
from pipeline.data.preprocess import (
    DenseStats,
    Preprocessor,
    as_float,
    check_binary_labels,
    check_weights,
    elementwise,
)
from pipeline.data.split import split_mask
from pipeline.errors import SchemaError
from pipeline.progress import progress


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


def _file_moments(
    footer: Footer, data: DataConfig
) -> tuple[dict[str, _Moments], int, np.ndarray, int]:
    file = footer.file
    fs, fs_path = filesystem_for(file)
    moments = {f.column: _Moments() for f in data.dense}
    train_rows, rows = 0, 0
    observed = np.zeros(len(data.tasks), dtype=np.int64)
    try:
        parquet = pq.ParquetFile(fs_path, filesystem=fs, metadata=footer.metadata)
        checked = [t.label_column for t in data.tasks] + [data.weight_column or ""]
        checked = [c for c in checked if c in parquet.schema_arrow.names]
        columns = [*(f.column for f in data.dense), data.split.column, *checked]
        batches = parquet.iter_batches(batch_size=131_072, columns=list(dict.fromkeys(columns)))
        for batch in batches:
            rows += batch.num_rows
            _check_rows(batch, data, file, observed)
            keep = split_mask(batch.column(data.split.column), data.split, "train")
            train_rows += int(keep.sum())
            for f in data.dense:
                # Every row, not only train rows: a NaN in validation fails here, not later.
                values = elementwise(as_float(batch.column(f.column)), f, file)
                moments[f.column].add(values[keep])
    except DECODE_ERRORS as err:
        raise corrupt_data(file, err) from None
    return moments, train_rows, observed, rows


def fit_preprocessor(data: DataConfig, files: InputFiles) -> Preprocessor:
    """Compute dense statistics in one streaming pass over the rows, checking every row.

    Args:
        data: the `data:` section of the config.
        files: the files from `check_schema(data)`.

    Raises:
        SchemaError: naming the file and the column (see the module docstring).

    Example:
        >>> pre = fit_preprocessor(cfg.data, check_schema(cfg.data))  # doctest: +SKIP
    """
    totals = {f.column: _Moments() for f in data.dense}
    train_rows, all_rows = 0, 0
    observed = np.zeros(len(data.tasks), dtype=np.int64)
    with (
        ThreadPoolExecutor(max_workers=min(4, len(files))) as pool,
        progress(len(files), "checking rows", "file") as bar,
    ):
        for moments, rows, seen, file_rows in pool.map(
            lambda footer: _file_moments(footer, data), files.footers
        ):
            train_rows += rows
            all_rows += file_rows
            observed += seen
            for column, m in moments.items():
                totals[column].merge(m)
            bar.set_postfix_str(f"{all_rows:,} rows", refresh=False)
            bar.update(1)
    _check_labels_observed(data, observed, all_rows)
    if train_rows == 0:
        raise SchemaError(
            f"data.path {data.path!r}: no rows fall in the train split "
            f"(split.method={data.split.method!r}, column {data.split.column!r})"
        )
    stats = {}
    for column, m in totals.items():
        std = float(np.sqrt(m.m2 / m.count)) if m.count else 1.0
        stats[column] = DenseStats(m.mean, std if std > 0 else 1.0, m.count)
    return Preprocessor(data, stats)
