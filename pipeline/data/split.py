"""Assign rows to train / validation / test from one column, vectorised and stable.

The assignment depends only on the row's own value of `split.column`, so it is the same for
every file, batch, worker and run:

- `hash`: the value's stable hash, mapped to [0, 1), below `validation_fraction` is
  validation, the next `test_fraction` is test, the rest train.
- `values`: the value is looked up in `validation_values`, `test_values` and (if given)
  `train_values`; without `train_values` every other row is train.
- `cutoff`: values >= `test_from` are test, values >= `validation_from` validation, the rest
  train. Rows whose value is null belong to no split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import SplitConfig
from pipeline.data.files import Footer, InputFiles
from pipeline.data.hashing import as_arrow, split_key, unit_interval
from pipeline.errors import ConfigError

SPLITS = ("train", "validation", "test")


def split_names(split: SplitConfig) -> list[str]:
    """The splits this config defines: train, validation, and test when it has one."""
    has_test = {
        "hash": split.test_fraction > 0,
        "values": bool(split.test_values),
        "cutoff": split.test_from is not None,
    }[split.method]
    return ["train", "validation", "test"] if has_test else ["train", "validation"]


def _typed(values: list[Any], column: pa.Array) -> pa.Array:
    """Config values (str or int) as an array of the column's type."""
    try:
        return pa.array([str(v) for v in values]).cast(column.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ConfigError(
            f"split: values {values} cannot be compared with column of type {column.type}: {err}"
        ) from None


def _fill(mask: pa.Array) -> np.ndarray:
    return mask.fill_null(False).to_numpy(zero_copy_only=False)


def split_mask(column: Any, split: SplitConfig, name: str) -> np.ndarray:
    """A boolean mask of the rows of `column` (the split column) that belong to split `name`.

    Args:
        column: the values of `split.column` for a batch (Arrow, numpy or pandas).
        split: the split config.
        name: "train", "validation" or "test".

    Example:
        >>> cfg = SplitConfig(method="cutoff", column="day", validation_from="2024-01-13")
        >>> split_mask(["2024-01-12", "2024-01-13"], cfg, "validation").tolist()
        [False, True]
    """
    return split_masks(column, split, [name])[name]


def split_masks(column: Any, split: SplitConfig, names: list[str]) -> dict[str, np.ndarray]:
    """`split_mask` of each split of `names`, the column read (and for `hash` hashed) once
    for them all: a row group of logs split by a hash holds rows of every split.

    Example:
        >>> cfg = SplitConfig(method="hash", column="user", validation_fraction=0.5)
        >>> masks = split_masks([1, 2, 3, 4], cfg, ["train", "validation"])
        >>> bool((masks["train"] ^ masks["validation"]).all())
        True
    """
    for name in names:
        if name not in SPLITS:
            raise ValueError(f"split name must be one of {SPLITS}, got {name!r}")
    method = {"hash": _hash_masks, "values": _values_masks, "cutoff": _cutoff_masks}[split.method]
    values = as_arrow(column, decode=False)
    if not pa.types.is_dictionary(values.type):
        masks = method(values, split)
        return {name: masks[name] for name in names}
    # A string column read as its Parquet dictionary (`feed.dictionary_columns`): each
    # entry's masks, then each row's entry's (a row's split depends on its value alone).
    # The entry after the dictionary's is a null row's (indices widened first: int8
    # indices of a 128-entry dictionary cannot hold 128).
    entries = pa.concat_arrays([values.dictionary, pa.nulls(1, values.dictionary.type)])
    index = values.indices.cast(pa.int64()).fill_null(len(values.dictionary))
    index = index.to_numpy(zero_copy_only=False)
    masks = method(entries, split)
    return {name: masks[name][index] for name in names}


def _hash_masks(values: pa.Array, split: SplitConfig) -> dict[str, np.ndarray]:
    u = unit_interval(values, split_key(split.salt))
    end_validation = split.validation_fraction
    end_test = end_validation + split.test_fraction
    return {
        "validation": u < end_validation,
        "test": (u >= end_validation) & (u < end_test),
        "train": u >= end_test,
    }


def _values_masks(values: pa.Array, split: SplitConfig) -> dict[str, np.ndarray]:
    validation = _fill(pc.is_in(values, _typed(split.validation_values, values)))
    test = (
        _fill(pc.is_in(values, _typed(split.test_values, values)))
        if split.test_values
        else np.zeros(len(values), dtype=bool)
    )
    test &= ~validation
    train = ~(validation | test)
    if split.train_values is not None:
        train &= _fill(pc.is_in(values, _typed(split.train_values, values)))
    return {"train": train, "validation": validation, "test": test}


def _cutoff_masks(values: pa.Array, split: SplitConfig) -> dict[str, np.ndarray]:
    (validation_from,) = _typed([split.validation_from], values).to_pylist()
    after_validation = _fill(pc.greater_equal(values, pa.scalar(validation_from, values.type)))
    if split.test_from is not None:
        (test_from,) = _typed([split.test_from], values).to_pylist()
        after_test = _fill(pc.greater_equal(values, pa.scalar(test_from, values.type)))
    else:
        after_test = np.zeros(len(values), dtype=bool)
    return {
        "train": _fill(pc.less(values, pa.scalar(validation_from, values.type))),
        "validation": after_validation & ~after_test,
        "test": after_test,
    }


def split_counts(column: Any, split: SplitConfig) -> dict[str, int]:
    """How many of the rows of `column` (the split column) fall in each split this config
    defines.

    Example:
        >>> cfg = SplitConfig(method="cutoff", column="day", validation_from="2024-01-13")
        >>> split_counts(["2024-01-12", "2024-01-13", None], cfg)
        {'train': 1, 'validation': 1}
    """
    names = split_names(split)
    masks = split_masks(column, split, names)  # the column read and hashed once for all
    return {name: int(masks[name].sum()) for name in names}


def _value_range(footer: Footer, column: str) -> tuple[Any, Any] | None:
    """(min, max) of a column over a file's row groups, or None without full statistics."""
    stats_per_group = footer.row_group_stats(column)
    if not stats_per_group or any(s is None or not s.has_min_max for s in stats_per_group):
        return None
    return min(s.min for s in stats_per_group), max(s.max for s in stats_per_group)


def _may_hold(low: Any, high: Any, split: SplitConfig, name: str, dtype: pa.DataType) -> bool:
    def scalar(value: Any) -> Any:
        return _typed([value], pa.array([], dtype)).to_pylist()[0]

    if split.method == "cutoff":
        validation_from = scalar(split.validation_from)
        test_from = None if split.test_from is None else scalar(split.test_from)
        if name == "train":
            return low < validation_from
        if name == "test":
            return test_from is not None and high >= test_from
        return high >= validation_from and (test_from is None or low < test_from)
    # values: only files holding a single value can be ruled out
    if low != high:
        return True
    validation = {scalar(v) for v in split.validation_values}
    test = {scalar(v) for v in split.test_values} - validation
    if name == "validation":
        return low in validation
    if name == "test":
        return low in test
    if split.train_values is not None:
        return low in {scalar(v) for v in split.train_values} - validation - test
    return low not in validation | test


def prune_files(split: SplitConfig, files: InputFiles, name: str) -> list[str]:
    """The files that may hold rows of split `name`, judged from their footer statistics.

    For `cutoff` and `values` splits over files partitioned by the split column (e.g. one
    file per day) this spares reading every file for the validation and test splits.
    Files without statistics are always kept; the row filter still applies.
    """
    if split.method == "hash" or not files:
        return files.paths
    kept = []
    for footer in files.footers:
        span = _value_range(footer, split.column)
        index = footer.schema.get_field_index(split.column)
        if span is None or index < 0:
            kept.append(footer.file)
            continue
        dtype = footer.schema.field(index).type
        try:
            if _may_hold(*span, split, name, dtype):
                kept.append(footer.file)
        except (TypeError, ConfigError):  # statistics not comparable: keep the file
            kept.append(footer.file)
    return kept or files.paths[:1]  # an empty split still needs a schema to read
