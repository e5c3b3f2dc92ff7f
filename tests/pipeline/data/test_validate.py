"""Footer-only schema checks: each bad input gets one error naming the file and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataConfig
from pipeline.data.files import resolve_files
from pipeline.data.validate import check_schema
from pipeline.errors import SchemaError


def _config(path: str | list[str], **extra) -> DataConfig:
    return DataConfig.model_validate(
        {
            "path": path,
            "categorical": [{"column": "user_id"}],
            "dense": [{"column": "price"}],
            "multi_hot": [{"column": "recent"}],
            "tasks": [
                {"name": "click", "type": "binary"},
                {"name": "watch", "type": "regression"},
            ],
            **extra,
        }
    )


def _table(rows: int = 20, **replace) -> pa.Table:
    cols = {
        "user_id": pa.array(np.arange(rows, dtype=np.int64)),
        "price": pa.array(np.linspace(1, 2, rows)),
        "recent": pa.array([[i, i + 1] for i in range(rows)], pa.list_(pa.int64())),
        "click": pa.array(np.arange(rows) % 2, pa.int8()),
        "watch": pa.array(np.ones(rows, np.float32), mask=np.arange(rows) % 2 == 0),
    }
    cols.update(replace)
    return pa.table({k: v for k, v in cols.items() if v is not None})


def _write(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def test_good_folder_passes_and_lists_parquet_files_only(tmp_path: Path) -> None:
    a = _write(tmp_path / "logs" / "a.parquet", _table())
    b = _write(tmp_path / "logs" / "sub" / "b.parquet", _table())
    (tmp_path / "logs" / "README.txt").write_text("not data")
    (tmp_path / "logs" / "_SUCCESS.parquet").write_text("")
    assert check_schema(_config(str(tmp_path / "logs"))).paths == [str(a), str(b)]


def test_globs_files_and_uris_resolve(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.parquet", _table())
    b = _write(tmp_path / "b.parquet", _table())
    assert resolve_files(str(tmp_path / "*.parquet")) == [str(a), str(b)]
    assert resolve_files([str(b), str(a)]) == [str(b), str(a)]
    assert resolve_files(f"file://{tmp_path}") == [str(a), str(b)]
    assert check_schema(_config(f"file://{a}")).paths == [str(a)]


def test_null_labels_are_allowed(tmp_path: Path) -> None:
    click = pa.array([1, None, 0, None], pa.int8())
    _write(tmp_path / "a.parquet", _table(4, click=click))
    assert len(check_schema(_config(str(tmp_path)))) == 1


def _error(path: Path | str, **extra) -> str:
    with pytest.raises(SchemaError) as err:
        check_schema(_config(str(path), **extra))
    return str(err.value)


def test_missing_path_and_empty_inputs(tmp_path: Path) -> None:
    assert "no such file or folder" in _error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "holds no Parquet files" in _error(tmp_path / "empty")
    assert "no files match" in _error(tmp_path / "*.parquet")
    f = _write(tmp_path / "zero" / "a.parquet", _table(0))
    msg = _error(f.parent)
    assert "0 rows" in msg


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    f = _write(tmp_path / "a.parquet", _table(price=None))
    msg = _error(f)
    assert str(f) in msg and "'price'" in msg and "not found" in msg
    assert "hive-style" not in msg


def test_hive_partition_folder_gets_a_hint(tmp_path: Path) -> None:
    f = _write(tmp_path / "price=3" / "part-0.parquet", _table(price=None))
    msg = _error(tmp_path)
    assert str(f) in msg and "'price'" in msg and "hive-style folders such as 'price=...'" in msg


@pytest.mark.parametrize(
    ("column", "values", "expected"),
    [
        ("price", pa.array(["1.5"] * 20), "expected a number"),
        ("click", pa.array(["yes"] * 20), "expected a number or bool"),
        ("watch", pa.array([True] * 20), "expected a number"),
        ("user_id", pa.array([[1]] * 20), "expected an integer, string or bool"),
        ("recent", pa.array([1] * 20), "expected a list of ints or strings"),
    ],
)
def test_wrong_types(tmp_path: Path, column: str, values: pa.Array, expected: str) -> None:
    f = _write(tmp_path / "a.parquet", _table(**{column: values}))
    msg = _error(f)
    assert str(f) in msg and repr(column) in msg and expected in msg


def test_not_parquet_and_truncated(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.parquet", _table())
    text = tmp_path / "text.parquet"
    text.write_text("user_id,price\n1,2\n")
    msg = _error(text)
    assert str(text) in msg and "not a Parquet file, or truncated" in msg
    truncated = tmp_path / "cut.parquet"
    truncated.write_bytes(good.read_bytes()[:-40])
    assert str(truncated) in _error(truncated)


def test_schema_drift_between_files(tmp_path: Path) -> None:
    _write(tmp_path / "a.parquet", _table())
    b = _write(tmp_path / "b.parquet", _table(user_id=pa.array(np.arange(20, dtype=np.int32))))
    msg = _error(tmp_path)
    assert str(b) in msg and "schema drift" in msg and "'user_id'" in msg


def test_large_string_is_not_drift(tmp_path: Path) -> None:
    _write(tmp_path / "a.parquet", _table(user_id=pa.array(["u"] * 20, pa.string())))
    _write(tmp_path / "b.parquet", _table(user_id=pa.array(["u"] * 20, pa.large_string())))
    assert len(check_schema(_config(str(tmp_path)))) == 2


def test_label_null_everywhere_is_an_error(tmp_path: Path) -> None:
    nulls = pa.array([None] * 20, pa.int8())
    _write(tmp_path / "a.parquet", _table(click=nulls))
    _write(tmp_path / "b.parquet", _table(click=nulls))
    msg = _error(tmp_path)
    assert "'click'" in msg and "null in all 40 rows" in msg


def test_binary_label_outside_0_1_from_statistics(tmp_path: Path) -> None:
    f = _write(tmp_path / "a.parquet", _table(click=pa.array(np.arange(20), pa.int64())))
    msg = _error(f)
    assert str(f) in msg and "'click'" in msg and "[0, 19]" in msg


def test_split_weight_and_passthrough_columns_are_checked(tmp_path: Path) -> None:
    f = _write(tmp_path / "a.parquet", _table())
    assert "'day'" in _error(f, split={"method": "cutoff", "column": "day", "validation_from": 3})
    assert "'w'" in _error(f, weight_column="w")
    assert "'event_id'" in _error(f, passthrough=["event_id"])


def test_many_files_are_read_in_parallel(tmp_path: Path) -> None:
    for i in range(12):
        _write(tmp_path / f"p{i:02d}.parquet", _table(5))
    bad = _write(tmp_path / "p07.parquet", _table(5, price=pa.array(["x"] * 5)))
    assert str(bad) in _error(tmp_path)


def test_scoring_inputs_need_features_and_passthrough_only(tmp_path: Path) -> None:
    # labels=False (adatt predict): no labels, weight or split column needed.
    f = _write(
        tmp_path / "a.parquet",
        _table(click=None, watch=None).append_column("id", pa.array(range(20))),
    )
    split = {"method": "cutoff", "column": "day", "validation_from": 3}
    data = _config(str(f), split=split, weight_column="w", passthrough=["id"])
    assert check_schema(data, labels=False).paths == [str(f)]
    with pytest.raises(SchemaError, match="'click'"):
        check_schema(data)
    g = _write(tmp_path / "b.parquet", _table(click=None, price=pa.array(["x"] * 20)))
    with pytest.raises(SchemaError, match=r"b\.parquet: column 'price' \(dense"):
        check_schema(_config(str(g)), labels=False)
    with pytest.raises(SchemaError, match="'event_id'"):
        check_schema(_config(str(f), passthrough=["event_id"]), labels=False)
