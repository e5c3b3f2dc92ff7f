"""Turn a batch of log rows into model inputs: pure numpy/pyarrow, no Ray.

`pipeline.data.fit.fit_preprocessor` streams once over the training rows to get each dense
feature's mean and standard deviation; the resulting `Preprocessor` is JSON-serialisable (`to_dict`) so that
checkpoints and the MLflow model carry it, and batch scoring reuses it unchanged.

Batch format (see `models.config.FeatureSchema`):
  categorical  int64 [B, C]   stable hash of each value into [0, buckets)
  dense        float32 [B, D] after `transform`; `standardize` and `log1p` are then scaled
               to zero mean and unit variance with the training statistics
  multi_hot.<column>  int64 [B, max_length]  ids in [1, buckets), 0 = padding
  labels       float32 [B, T] 0 where missing;  mask float32 [B, T] 1 observed / 0 null
  weight       float32 [B]    the weight column, or ones
  group.<column>  int64 [B]   GAUC group key of each row (`hashing.group_keys`), for each
               of `data.group_columns`
  passthrough.<column>        raw values, only with `passthrough=True`
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import DataConfig, DenseFeature, TaskSpec
from pipeline.data.hashing import Hashed, as_arrow, bucketize
from pipeline.errors import SchemaError

Batch = pa.Table | pd.DataFrame | dict[str, Any]


@dataclass
class DenseStats:
    """Mean and standard deviation of a dense feature after its elementwise transform."""

    mean: float = 0.0
    std: float = 1.0
    count: int = 0


def elementwise(values: np.ndarray, feature: DenseFeature, where: str) -> np.ndarray:
    """Impute non-finite values (or fail), then apply the feature's elementwise transform."""
    if not _all_finite(values):
        bad = ~np.isfinite(values)
        if feature.impute is None:
            raise SchemaError(
                f"{where}: column {feature.column!r} (dense feature) has {int(bad.sum())} "
                f"null/NaN/inf value(s); clean the data or set `impute` for this feature"
            )
        values = np.where(bad, feature.impute, values)
    if feature.transform == "log1p":
        # Sign-preserving so that negative values (refunds, deltas) stay ordered:
        # sign(v) * log1p(|v|), in place in one new array (adding 0.0 makes copysign's
        # -0.0 the 0.0 that sign(-0.0) gives).
        out = np.abs(values)
        np.log1p(out, out=out)
        np.copysign(out, values, out=out)
        out += 0.0
        return out
    return values


def _all_finite(values: np.ndarray) -> bool:
    """Whether no value is NaN or infinite: two reductions (NaN and inf reach min or max)
    instead of a mask of the whole column."""
    return not len(values) or bool(np.isfinite(values.min()) and np.isfinite(values.max()))


def check_binary_labels(y: np.ndarray, task: TaskSpec, where: str) -> None:
    """SchemaError naming `where` and the column when an observed label of a binary task is
    not 0 or 1 (`y` as from `as_float`: NaN where the label is missing)."""
    if task.type != "binary":
        return
    # y * (1 - y) is 0 for 0 and 1 only, NaN for a missing label, and -inf for an infinite
    # one; fmin and fmax skip NaN: two reductions instead of masks of the column.
    product = 1.0 - y
    product *= y
    high, low = np.fmax.reduce(product, initial=0.0), np.fmin.reduce(product, initial=0.0)
    if high == 0 and low == 0:
        return
    seen = y[np.isfinite(y)]
    bad = seen[(seen != 0) & (seen != 1)]
    if len(bad):
        raise SchemaError(
            f"{where}: column {task.label_column!r} (binary label of task {task.name!r}) "
            f"has values {np.unique(bad)[:5].tolist()}; binary labels must be 0 or 1"
        )


def check_weights(weight: np.ndarray, column: str, where: str) -> None:
    """SchemaError naming `where` and the column unless every sample weight is finite and
    not negative."""
    if not (np.isfinite(weight) & (weight >= 0)).all():
        raise SchemaError(
            f"{where}: column {column!r} (sample weight) has null, negative or non-finite values"
        )


def as_float(column: Any) -> np.ndarray:
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
        table = _as_table(batch, self.data.columns(labels=with_labels, passthrough=passthrough))
        rows = table.num_rows
        out: dict[str, np.ndarray] = {}
        data = self.data
        hashed: dict[str, Hashed] = {}  # a column hashed once (a feature and a group key)

        def hashed_column(column: str) -> Hashed:
            if column not in hashed:
                hashed[column] = Hashed.of(table[column])
            return hashed[column]

        if data.categorical:
            ids = np.empty((rows, len(data.categorical)), dtype=np.int64)
            for j, f in enumerate(data.categorical):
                ids[:, j] = hashed_column(f.column).buckets(f.buckets)
            out["categorical"] = ids
        if data.dense:
            dense = np.empty((rows, len(data.dense)), dtype=np.float32)
            for j, f in enumerate(data.dense):
                values = elementwise(as_float(table[f.column]), f, "batch")
                if f.transform != "none":
                    stats = self.dense_stats.get(f.column, DenseStats())
                    # (v - mean) / std in float64, written once as float32.
                    np.divide(values - stats.mean, stats.std, out=dense[:, j])
                else:
                    dense[:, j] = values
            out["dense"] = dense
        for f in data.multi_hot:
            out[f"multi_hot.{f.column}"] = self._multi_hot(table[f.column], f.buckets, f.max_length)
        if with_labels:
            labels = np.zeros((rows, len(data.tasks)), dtype=np.float32)
            mask = np.zeros((rows, len(data.tasks)), dtype=np.float32)
            for j, task in enumerate(data.tasks):
                y = as_float(table[task.label_column])
                check_binary_labels(y, task, "batch")
                observed = np.isfinite(y)
                labels[:, j] = np.where(observed, y, 0.0)
                mask[:, j] = observed
            out["labels"], out["mask"] = labels, mask
            if data.weight_column:
                weight = as_float(table[data.weight_column])
                check_weights(weight, data.weight_column, "batch")
                out["weight"] = weight.astype(np.float32)
            else:
                out["weight"] = np.ones(rows, dtype=np.float32)
            for column in data.group_columns:
                out[f"group.{column}"] = hashed_column(column).group_keys()
        if passthrough:
            for column in data.passthrough:
                out[f"passthrough.{column}"] = table[column].to_numpy()
        return out

    def empty(self, with_labels: bool = True) -> dict[str, np.ndarray]:
        """A batch of no rows in the layout of `transform`'s output (keys, dtypes, widths)."""
        data = self.data
        out: dict[str, np.ndarray] = {}
        if data.categorical:
            out["categorical"] = np.zeros((0, len(data.categorical)), dtype=np.int64)
        if data.dense:
            out["dense"] = np.zeros((0, len(data.dense)), dtype=np.float32)
        for f in data.multi_hot:
            out[f"multi_hot.{f.column}"] = np.zeros((0, f.max_length), dtype=np.int64)
        if with_labels:
            out["labels"] = np.zeros((0, len(data.tasks)), dtype=np.float32)
            out["mask"] = np.zeros((0, len(data.tasks)), dtype=np.float32)
            out["weight"] = np.zeros(0, dtype=np.float32)
            for column in data.group_columns:
                out[f"group.{column}"] = np.zeros(0, dtype=np.int64)
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
        ids = bucketize(flat, buckets - 1, offset=1)
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
