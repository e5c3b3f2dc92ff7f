"""Check the Parquet logs against the data config from their footers, before any worker starts.

Only file metadata is read (a few KiB per file, in parallel threads), so the check costs
about the same for one file or thousands. Every problem is one `SchemaError` whose message
names the file and the column.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from pipeline.config import DataConfig
from pipeline.data.files import Footer, InputFiles, resolve_files
from pipeline.errors import SchemaError


def _base(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _bool(t: pa.DataType) -> bool:
    return pa.types.is_boolean(_base(t))


def _numeric(t: pa.DataType) -> bool:
    t = _base(t)
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _id(t: pa.DataType) -> bool:
    """An id: integer, string or bool. Not a float: a float id column's NaN has no id, and
    1.0 and 1.5 would be different ids with no sign of a problem."""
    t = _base(t)
    return (
        pa.types.is_integer(t)
        or pa.types.is_boolean(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
    )


def _ordered(t: pa.DataType) -> bool:
    t = _base(t)
    return _numeric(t) or _id(t) or pa.types.is_temporal(t)


def _list_of_ids(t: pa.DataType) -> bool:
    listy = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    return listy and _id(t.value_type)


def _anything(t: pa.DataType) -> bool:
    return True


@dataclass(frozen=True)
class _Need:
    role: str  # how the column is used, for the error message
    accepts: Callable[[pa.DataType], bool]
    expected: str


def required_columns(data: DataConfig, labels: bool = True) -> dict[str, _Need]:
    """Every column the config reads, with what it is used for and the types it accepts.

    With `labels=False` (scoring) only the feature and passthrough columns are required:
    no labels, no sample weight, no split column.
    """
    need: dict[str, _Need] = {}
    for f in data.categorical:
        need[f.column] = _Need(
            "categorical feature", _id, "an integer, string or bool (cast float ids to int64)"
        )
    for f in data.dense:
        need[f.column] = _Need(f"dense feature ({f.transform})", _numeric, "a number")
    for f in data.multi_hot:
        need[f.column] = _Need("multi-hot feature", _list_of_ids, "a list of ints or strings")
    if labels:
        for t in data.tasks:
            expected = "a number or bool" if t.type == "binary" else "a number"
            accepts = _numeric if t.type == "binary" else (lambda x: _numeric(x) and not _bool(x))
            need[t.label_column] = _Need(f"{t.type} label of task {t.name!r}", accepts, expected)
        if data.weight_column:
            need[data.weight_column] = _Need("sample weight", _numeric, "a number")
        for column in data.group_columns:
            need.setdefault(column, _Need("GAUC group column", _id, "an integer or string"))
        split_need = {
            "hash": _Need("split key (hash)", _id, "an integer, string or bool"),
            "values": _Need("split column (values)", _id, "an integer or string"),
            "cutoff": _Need("split column (cutoff)", _ordered, "a number, string, date or time"),
        }[data.split.method]
        need.setdefault(data.split.column, split_need)
    for column in data.passthrough:
        need.setdefault(column, _Need("passthrough column", _anything, "any type"))
    return need


def _normalised(t: pa.DataType) -> pa.DataType:
    """Types that read back identically count as the same (no drift)."""
    t = _base(t)
    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_large_list(t):
        return pa.list_(_normalised(t.value_type))
    return t


def _label_statistics(footers: InputFiles, data: DataConfig) -> None:
    """Cheap checks from row-group statistics: all-null labels, binary labels outside {0, 1}."""
    for task in data.tasks:
        column = task.label_column
        nulls, complete = 0, True
        for footer in footers.footers:
            stats_per_group = footer.row_group_stats(column)
            if stats_per_group is None:
                complete = False
                continue
            for stats in stats_per_group:
                if stats is None or not stats.has_null_count:
                    complete = False
                    continue
                nulls += stats.null_count
                if (
                    task.type == "binary"
                    and stats.has_min_max
                    and not isinstance(stats.min, bool)
                    and (stats.min < 0 or stats.max > 1)
                ):
                    raise SchemaError(
                        f"{footer.file}: column {column!r} (binary label of task {task.name!r}) "
                        f"has values in [{stats.min}, {stats.max}]; binary labels must be 0 or 1"
                    )
        if complete and footers.rows and nulls == footers.rows:
            raise SchemaError(
                f"{footers.paths[0]} (and {len(footers) - 1} more files): column {column!r} "
                f"(label of task {task.name!r}) is null in all {footers.rows} rows"
            )


def _check_columns(footer: Footer, need: dict[str, _Need]) -> None:
    for column, spec in need.items():
        index = footer.schema.get_field_index(column)
        if index < 0:
            shown = ", ".join(footer.schema.names[:20])
            hint = ""
            if f"/{column}=" in f"/{footer.file}":
                hint = (
                    f" (hive-style folders such as '{column}=...' are not read as "
                    "columns: write the column into the files)"
                )
            raise SchemaError(
                f"{footer.file}: column {column!r} ({spec.role}) not found; "
                f"the file has: {shown}{hint}"
            )
        dtype = footer.schema.field(index).type
        if not spec.accepts(dtype):
            raise SchemaError(
                f"{footer.file}: column {column!r} ({spec.role}) has type {dtype}; "
                f"expected {spec.expected}"
            )


def check_schema(data: DataConfig, labels: bool = True) -> InputFiles:
    """Resolve the input files and check them against the config from their footers only.

    Raises one `SchemaError` naming the file and the column for: no input files or no rows,
    a file that is not Parquet or is truncated, a missing column, a column of the wrong type,
    a column whose type differs between files (drift), a label that is null in every row,
    and a binary label whose row-group statistics fall outside [0, 1]. Null labels are fine.

    Args:
        data: the `data:` section of the config.
        labels: False for scoring inputs: only feature and passthrough columns are checked
            (see `required_columns`), and the label statistics are skipped.

    Returns:
        The files (local paths or URIs, ready for `ray.data.read_parquet`) with their
        footers, which later steps reuse instead of reading them again.
    """
    files = resolve_files(data.path)
    if not files:
        raise SchemaError(f"data.path {data.path!r}: no Parquet files found")
    footers = InputFiles.read(files)
    need = required_columns(data, labels=labels)
    for footer in footers.footers:
        _check_columns(footer, need)
    first = footers.footers[0]
    for footer in footers.footers[1:]:
        for column in need:
            a = first.schema.field(column).type
            b = footer.schema.field(column).type
            if _normalised(a) != _normalised(b):
                raise SchemaError(
                    f"{footer.file}: schema drift: column {column!r} is {b} here but {a} in "
                    f"{first.file}"
                )
    if footers.rows == 0:
        raise SchemaError(f"data.path {data.path!r}: all {len(files)} file(s) have 0 rows")
    if labels:
        _label_statistics(footers, data)
    return footers
