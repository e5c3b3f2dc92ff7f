"""Turn a batch of log rows into model inputs: pure numpy/pyarrow, no Ray.

`fit_preprocessor` streams once over the training rows to get each dense feature's mean and
standard deviation; the resulting `Preprocessor` is JSON-serialisable (`to_dict`) so that
checkpoints and the MLflow model carry it, and batch scoring reuses it unchanged.

Batch format (see `models.config.FeatureSchema`):
  categorical  int64 [B, C]   stable hash of each value into [0, buckets)
  dense        float32 [B, D] after `transform`; `standardize` and `log1p` are then scaled
               to zero mean and unit variance with the training statistics
  multi_hot.<column>  int64 [B, max_length]  ids in [1, buckets), 0 = padding
  labels       float32 [B, T] 0 where missing;  mask float32 [B, T] 1 observed / 0 null
  weight       float32 [B]    the weight column, or ones
  passthrough.<column>        raw values, only with `passthrough=True`
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import DataConfig, DenseFeature
from pipeline.errors import SchemaError
from pipeline.hashing import as_arrow, stable_hash
from pipeline.progress import progress
from pipeline.schema import filesystem_for
from pipeline.split import split_mask

Batch = pa.Table | pd.DataFrame | dict[str, Any]


@dataclass
class DenseStats:
    """Mean and standard deviation of a dense feature after its elementwise transform."""

    mean: float = 0.0
    std: float = 1.0
    count: int = 0


def _elementwise(values: np.ndarray, feature: DenseFeature, where: str) -> np.ndarray:
    """Impute non-finite values (or fail), then apply the feature's elementwise transform."""
    bad = ~np.isfinite(values)
    if bad.any():
        if feature.impute is None:
            raise SchemaError(
                f"{where}: column {feature.column!r} (dense feature) has {int(bad.sum())} "
                f"null/NaN/inf value(s); clean the data or set `impute` for this feature"
            )
        values = np.where(bad, feature.impute, values)
    if feature.transform == "log1p":
        # Sign-preserving so that negative values (refunds, deltas) stay ordered.
        values = np.sign(values) * np.log1p(np.abs(values))
    return values


def _as_float(column: Any) -> np.ndarray:
    """float64 numpy with NaN for null; bools become 0/1."""
    arr = as_arrow(column)
    if not pa.types.is_floating(arr.type):
        arr = pc.cast(arr, pa.float64())
    return arr.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def _as_table(batch: Batch, columns: list[str]) -> pa.Table:
    """The needed columns of any supported batch type as an Arrow table."""
    available = (
        batch.column_names
        if isinstance(batch, pa.Table | pa.RecordBatch)
        else list(batch.columns)
        if isinstance(batch, pd.DataFrame)
        else list(batch)
    )
    missing = [c for c in columns if c not in available]
    if missing:
        raise SchemaError(f"batch: column(s) {missing} not found; it has {list(available)[:20]}")
    if isinstance(batch, pa.RecordBatch):
        batch = pa.Table.from_batches([batch])
    if isinstance(batch, pa.Table):
        return batch.select(columns)
    return pa.table({c: as_arrow(batch[c]) for c in columns})


class Preprocessor:
    """The data config plus fitted dense statistics; maps raw batches to model inputs.

    Args:
        data: the `data:` section of the config.
        dense_stats: per dense column, statistics from `fit_preprocessor`.

    Example:
        >>> pre = Preprocessor(data, {"price": DenseStats(10.0, 2.0, 100)})  # doctest: +SKIP
        >>> pre.transform(df)["dense"].shape  # doctest: +SKIP
        (len(df), 1)
    """

    def __init__(self, data: DataConfig, dense_stats: dict[str, DenseStats] | None = None):
        self.data = data
        self.dense_stats = dict(dense_stats or {})

    def input_columns(self, with_labels: bool = True, passthrough: bool = False) -> list[str]:
        """The raw columns `transform` reads, without duplicates."""
        cols = list(self.data.feature_columns)
        if with_labels:
            cols += [t.label_column for t in self.data.tasks]
            if self.data.weight_column:
                cols.append(self.data.weight_column)
        if passthrough:
            cols += self.data.passthrough
        return list(dict.fromkeys(cols))

    def transform(
        self, batch: Batch, with_labels: bool = True, passthrough: bool = False
    ) -> dict[str, np.ndarray]:
        """Map a batch (Arrow table, pandas DataFrame or dict of arrays) to model inputs.

        Args:
            batch: raw rows; extra columns are ignored.
            with_labels: also return `labels`, `mask` and `weight` (training, evaluation).
            passthrough: also return `passthrough.<column>` for each `data.passthrough`.

        Returns:
            A dict of numpy arrays, as in the module docstring.
        """
        table = _as_table(batch, self.input_columns(with_labels, passthrough))
        rows = table.num_rows
        out: dict[str, np.ndarray] = {}
        data = self.data
        if data.categorical:
            ids = np.empty((rows, len(data.categorical)), dtype=np.int64)
            for j, f in enumerate(data.categorical):
                ids[:, j] = stable_hash(table[f.column]) % np.uint64(f.buckets)
            out["categorical"] = ids
        if data.dense:
            dense = np.empty((rows, len(data.dense)), dtype=np.float32)
            for j, f in enumerate(data.dense):
                values = _elementwise(_as_float(table[f.column]), f, "batch")
                if f.transform != "none":
                    stats = self.dense_stats.get(f.column, DenseStats())
                    values = (values - stats.mean) / stats.std
                dense[:, j] = values
            out["dense"] = dense
        for f in data.multi_hot:
            out[f"multi_hot.{f.column}"] = self._multi_hot(table[f.column], f.buckets, f.max_length)
        if with_labels:
            labels = np.zeros((rows, len(data.tasks)), dtype=np.float32)
            mask = np.zeros((rows, len(data.tasks)), dtype=np.float32)
            for j, task in enumerate(data.tasks):
                y = _as_float(table[task.label_column])
                observed = np.isfinite(y)
                if task.type == "binary" and ((y[observed] != 0) & (y[observed] != 1)).any():
                    raise SchemaError(
                        f"batch: column {task.label_column!r} (binary label of task "
                        f"{task.name!r}) has values other than 0 and 1"
                    )
                labels[:, j] = np.where(observed, y, 0.0)
                mask[:, j] = observed
            out["labels"], out["mask"] = labels, mask
            if data.weight_column:
                weight = _as_float(table[data.weight_column])
                if not (np.isfinite(weight) & (weight >= 0)).all():
                    raise SchemaError(
                        f"batch: column {data.weight_column!r} (sample weight) has null, "
                        f"negative or non-finite values"
                    )
                out["weight"] = weight.astype(np.float32)
            else:
                out["weight"] = np.ones(rows, dtype=np.float32)
        if passthrough:
            for column in data.passthrough:
                out[f"passthrough.{column}"] = table[column].to_numpy()
        return out

    @staticmethod
    def _multi_hot(column: Any, buckets: int, max_length: int) -> np.ndarray:
        """Hash each list's first `max_length` values to ids in [1, buckets); 0 pads."""
        lists = as_arrow(column)
        if pa.types.is_null(lists.type):  # e.g. an all-None pandas object column
            return np.zeros((len(lists), max_length), dtype=np.int64)
        lists = pc.list_slice(lists, 0, max_length)
        lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False)
        flat = pc.list_flatten(lists)
        ids = (stable_hash(flat) % np.uint64(buckets - 1)).astype(np.int64) + 1
        ids[flat.is_null().to_numpy(zero_copy_only=False)] = 0  # a null element is padding
        rows = np.repeat(np.arange(len(lengths)), lengths)
        starts = np.cumsum(lengths) - lengths
        positions = np.arange(len(flat)) - np.repeat(starts, lengths)
        out = np.zeros((len(lengths), max_length), dtype=np.int64)
        out[rows, positions] = ids
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (config and statistics)."""
        return {
            "version": 1,
            "data": self.data.model_dump(mode="json"),
            "dense_stats": {k: asdict(v) for k, v in self.dense_stats.items()},
        }

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> Preprocessor:
        """Rebuild from `to_dict()` output."""
        stats = {k: DenseStats(**v) for k, v in payload.get("dense_stats", {}).items()}
        return cls(DataConfig.model_validate(payload["data"]), stats)


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


# --- Row checks on the driver (reliability). The fit pass reads every row of the dense,
# label and weight columns anyway, so it also rejects, naming the file and the column,
# what would otherwise fail later inside a Ray worker: NaN/inf dense values in any split
# (unless `impute`), binary labels outside {0, 1} (also without footer statistics),
# invalid sample weights, unreadable pages, and a label that is null in every row.


def _check_rows(batch: pa.RecordBatch, data: DataConfig, file: str, observed: np.ndarray) -> None:
    """Fail on label and weight values a worker would reject; count observed labels."""
    names = set(batch.schema.names)
    for j, task in enumerate(data.tasks):
        if task.label_column not in names:  # `check_schema` requires it; unit tests may not
            observed[j] += batch.num_rows
            continue
        y = _as_float(batch.column(task.label_column))
        seen = np.isfinite(y)
        observed[j] += int(seen.sum())
        if task.type == "binary" and ((y[seen] != 0) & (y[seen] != 1)).any():
            bad = np.unique(y[seen][(y[seen] != 0) & (y[seen] != 1)])[:5].tolist()
            raise SchemaError(
                f"{file}: column {task.label_column!r} (binary label of task {task.name!r}) "
                f"has values {bad}; binary labels must be 0 or 1"
            )
    if data.weight_column in names:
        weight = _as_float(batch.column(data.weight_column))
        if not (np.isfinite(weight) & (weight >= 0)).all():
            raise SchemaError(
                f"{file}: column {data.weight_column!r} (sample weight) has null, negative "
                f"or non-finite values"
            )


def _check_labels_observed(data: DataConfig, observed: np.ndarray, rows: int) -> None:
    for task, count in zip(data.tasks, observed, strict=True):
        if rows and count == 0:
            raise SchemaError(
                f"data.path {data.path!r}: column {task.label_column!r} (label of task "
                f"{task.name!r}) is null in all {rows} rows"
            )


# --- end of row checks


def _file_moments(file: str, data: DataConfig) -> tuple[dict[str, _Moments], int, np.ndarray, int]:
    fs, fs_path = filesystem_for(file)
    moments = {f.column: _Moments() for f in data.dense}
    train_rows, rows = 0, 0
    observed = np.zeros(len(data.tasks), dtype=np.int64)
    try:
        parquet = pq.ParquetFile(fs_path, filesystem=fs)
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
                values = _elementwise(_as_float(batch.column(f.column)), f, file)
                moments[f.column].add(values[keep])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        reason = " ".join(str(err).split())  # Arrow's messages span lines; keep one
        raise SchemaError(f"{file}: corrupt Parquet data, cannot read it ({reason})") from None
    return moments, train_rows, observed, rows


def fit_preprocessor(data: DataConfig, files: list[str]) -> Preprocessor:
    """Compute dense statistics in one streaming pass over the training rows.

    The same pass checks every row's dense, label and weight values (see `_check_rows`), so
    bad values fail here, on the driver, naming the file and the column.
    Memory stays bounded (one 128k-row batch of the dense, split, label and weight columns
    per thread).

    Args:
        data: the `data:` section of the config.
        files: the files from `check_schema(data)`.

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
        for moments, rows, seen, file_rows in pool.map(lambda f: _file_moments(f, data), files):
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
