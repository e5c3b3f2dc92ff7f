"""Preprocessing: output dtypes/shapes, masks, hashing, dense statistics, serialisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config import DataConfig, DenseFeature, TaskSpec
from pipeline.data.files import InputFiles
from pipeline.data.fit import fit_preprocessor
from pipeline.data.hashing import FEATURE_KEY, Hashed, bucketize, group_keys
from pipeline.data.preprocess import (
    DenseStats,
    Preprocessor,
    check_binary_labels,
    elementwise,
)
from pipeline.data.split import split_mask
from pipeline.errors import SchemaError


def _config(**extra) -> DataConfig:
    raw = {
        "categorical": [{"column": "user_id", "buckets": 1000}, {"column": "device", "buckets": 7}],
        "dense": [
            {"column": "price", "transform": "standardize"},
            {"column": "views", "transform": "log1p"},
            {"column": "position", "transform": "none"},
        ],
        "multi_hot": [{"column": "recent", "buckets": 50, "max_length": 3}],
        "tasks": [
            {"name": "click"},
            {"name": "like"},
            {"name": "watch", "type": "regression"},
        ],
        "split": {"method": "hash", "column": "user_id", "validation_fraction": 0.25},
        "passthrough": ["event_id"],
    }
    raw.update(extra)
    return DataConfig.model_validate(raw)


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "event_id": [10, 11, 12, 13],
            "user_id": [1, 2, 3, 1],
            "device": ["ios", "web", "ios", "android"],
            "price": [1.0, 2.0, 3.0, 4.0],
            "views": [0.0, 9.0, 99.0, -9.0],
            "position": np.array([0, 1, 2, 3], np.int16),
            "recent": [[5, 6, 7, 8], [], None, [9]],
            "click": np.array([1, 0, 1, 0], np.int8),
            "like": pd.array([1, None, 0, None], dtype="Int8"),
            "watch": [2.5, np.nan, 0.5, np.nan],
        }
    )


def test_output_keys_dtypes_and_shapes() -> None:
    pre = Preprocessor(_config(), {"price": DenseStats(2.0, 0.5, 4), "views": DenseStats(1, 2, 4)})
    out = pre.transform(_frame())
    assert sorted(out) == ["categorical", "dense", "labels", "mask", "multi_hot.recent", "weight"]
    assert out["categorical"].dtype == np.int64 and out["categorical"].shape == (4, 2)
    assert out["dense"].dtype == np.float32 and out["dense"].shape == (4, 3)
    assert out["multi_hot.recent"].dtype == np.int64 and out["multi_hot.recent"].shape == (4, 3)
    for key in ("labels", "mask"):
        assert out[key].dtype == np.float32 and out[key].shape == (4, 3)
    assert out["weight"].dtype == np.float32 and out["weight"].tolist() == [1, 1, 1, 1]


def test_labels_and_masks() -> None:
    out = Preprocessor(_config()).transform(_frame())
    np.testing.assert_array_equal(out["mask"], [[1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(out["labels"], [[1, 1, 2.5], [0, 0, 0], [1, 0, 0.5], [0, 0, 0]])


def test_categorical_ids_are_stable_hashes() -> None:
    out = Preprocessor(_config()).transform(_frame())
    np.testing.assert_array_equal(out["categorical"][:, 0], bucketize([1, 2, 3, 1], 1000))
    np.testing.assert_array_equal(
        out["categorical"][:, 1], bucketize(["ios", "web", "ios", "android"], 7)
    )
    assert out["categorical"][0, 0] == out["categorical"][3, 0]


def test_dense_transforms() -> None:
    stats = {"price": DenseStats(2.0, 0.5, 4), "views": DenseStats(1.0, 2.0, 4)}
    out = Preprocessor(_config(), stats).transform(_frame())
    np.testing.assert_allclose(out["dense"][:, 0], [-2, 0, 2, 4])
    logged = np.sign([0, 9, 99, -9]) * np.log1p(np.abs([0, 9, 99, -9]))
    np.testing.assert_allclose(out["dense"][:, 1], (logged - 1.0) / 2.0, rtol=1e-6)
    np.testing.assert_allclose(out["dense"][:, 2], [0, 1, 2, 3])


def test_multi_hot_truncates_pads_and_avoids_zero() -> None:
    ids = Preprocessor(_config()).transform(_frame())["multi_hot.recent"]
    assert (ids[0] > 0).all() and (ids[0] < 50).all()  # first 3 of 4 kept, none is padding
    assert ids[1].tolist() == [0, 0, 0] and ids[2].tolist() == [0, 0, 0]
    assert ids[3, 0] > 0 and ids[3, 1:].tolist() == [0, 0]


def test_arrow_pandas_and_dict_inputs_agree() -> None:
    pre = Preprocessor(_config(), {"price": DenseStats(2.0, 0.5, 4)})
    frame = _frame()
    expected = pre.transform(frame)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    as_dict = {c: frame[c].to_numpy() for c in frame.columns}
    as_dict["like"] = np.array([1.0, np.nan, 0.0, np.nan])
    for batch in (table, as_dict):
        out = pre.transform(batch)
        for key, value in expected.items():
            np.testing.assert_array_equal(out[key], value, err_msg=key)


def test_scoring_mode_and_passthrough() -> None:
    frame = _frame().drop(columns=["click", "like", "watch"])
    out = Preprocessor(_config()).transform(frame, with_labels=False, passthrough=True)
    assert "labels" not in out and "mask" not in out and "weight" not in out
    assert out["passthrough.event_id"].tolist() == [10, 11, 12, 13]


def test_only_present_feature_kinds_are_returned() -> None:
    cfg = _config(categorical=[], multi_hot=[])
    out = Preprocessor(cfg).transform(_frame())
    assert "categorical" not in out and "dense" in out
    cfg = _config(dense=[], multi_hot=[])
    assert "dense" not in Preprocessor(cfg).transform(_frame())


def test_weight_column() -> None:
    frame = _frame().assign(w=[1.0, 2.0, 0.5, 0.0])
    out = Preprocessor(_config(weight_column="w")).transform(frame)
    assert out["weight"].tolist() == [1.0, 2.0, 0.5, 0.0]
    with pytest.raises(SchemaError, match="'w'"):
        Preprocessor(_config(weight_column="w")).transform(frame.assign(w=[1, np.nan, 1, 1]))


def test_bad_values_name_the_column() -> None:
    frame = _frame()
    with pytest.raises(SchemaError, match="'price'.*1 null/NaN/inf"):
        Preprocessor(_config()).transform(frame.assign(price=[1.0, np.inf, 2, 3]))
    with pytest.raises(SchemaError, match=r"batch: column 'click' .* has values \[2.0\]; binary"):
        Preprocessor(_config()).transform(frame.assign(click=[0, 2, 1, 0]))
    with pytest.raises(SchemaError, match="'user_id'"):
        Preprocessor(_config()).transform(frame.drop(columns=["user_id"]))


def test_impute_replaces_bad_dense_values() -> None:
    cfg = _config(dense=[{"column": "price", "transform": "none", "impute": -1.0}])
    out = Preprocessor(cfg).transform(_frame().assign(price=[1.0, np.nan, None, np.inf]))
    assert out["dense"][:, 0].tolist() == [1.0, -1.0, -1.0, -1.0]


def test_empty_batch() -> None:
    out = Preprocessor(_config()).transform(_frame().iloc[:0])
    assert out["categorical"].shape == (0, 2) and out["labels"].shape == (0, 3)


def test_to_dict_round_trips_through_json() -> None:
    pre = Preprocessor(_config(), {"price": DenseStats(2.0, 0.5, 4)})
    again = Preprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert again.data == pre.data and again.dense_stats == pre.dense_stats
    for key, value in pre.transform(_frame()).items():
        np.testing.assert_array_equal(again.transform(_frame())[key], value)


def test_fit_streams_over_train_rows_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = []
    for i in range(3):
        n = 50_000
        frame = pd.DataFrame(
            {
                "user_id": rng.integers(0, 5000, n),
                "device": "ios",
                "price": rng.normal(10 + i, 2 + i, n),
                "views": rng.exponential(50, n),
                "position": rng.integers(0, 20, n),
            }
        )
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / f"{i}.parquet")
        frames.append(frame)
    cfg = _config(multi_hot=[], path=str(tmp_path))
    pre = fit_preprocessor(cfg, InputFiles.read(sorted(str(p) for p in tmp_path.glob("*.parquet"))))
    every = pd.concat(frames)
    train = every[split_mask(every["user_id"], cfg.split, "train")]
    assert pre.dense_stats["price"].count == len(train) < len(every)
    assert pre.dense_stats["price"].mean == pytest.approx(train["price"].mean(), rel=1e-9)
    assert pre.dense_stats["price"].std == pytest.approx(train["price"].std(ddof=0), rel=1e-9)
    logged = np.log1p(train["views"])
    assert pre.dense_stats["views"].mean == pytest.approx(logged.mean(), rel=1e-9)
    out = pre.transform(train.assign(click=0, like=0, watch=0.0, recent=None))
    assert abs(out["dense"][:, 0].mean()) < 1e-4 and out["dense"][:, 0].std() == pytest.approx(
        1, abs=1e-4
    )


def test_fit_reports_nan_with_file_and_column(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": [1, 2],
                "device": ["a", "b"],
                "price": [1.0, None],
                "views": [1.0, 2.0],
                "position": [1, 2],
            }
        ),
        path,
    )
    with pytest.raises(SchemaError, match=f"{path}.*'price'"):
        fit_preprocessor(
            _config(split={"method": "hash", "column": "user_id", "validation_fraction": 0.0}),
            InputFiles.read([str(path)]),
        )


def _reference_bad_labels(y: np.ndarray) -> bool:
    """The rule, stated plainly: an observed (finite) binary label that is not 0 or 1."""
    seen = y[np.isfinite(y)]
    return bool(((seen != 0) & (seen != 1)).any())


# Labels on every side of the check's arithmetic: missing, infinite, tiny, just below 1.
TRICKY_LABELS = [0.0, 1.0, -0.0, np.nan, np.inf, -np.inf, 2.0, 0.5, -1.0, 1e-300, 5e-324]
TRICKY_LABELS += [1 - 2**-53]


@given(st.lists(st.sampled_from(TRICKY_LABELS), max_size=12))
def test_binary_labels_are_checked_as_the_rule_states(values: list[float]) -> None:
    """The check's two reductions agree with the plain rule on every mix of edge values:
    missing (NaN) and infinite labels pass, anything observed besides 0 and 1 fails."""
    y = np.array(values, dtype=np.float64)
    task = TaskSpec(name="click", label="click", type="binary")
    if _reference_bad_labels(y):
        with pytest.raises(SchemaError, match="'click'"):
            check_binary_labels(y, task, "batch")
    else:
        check_binary_labels(y, task, "batch")


@given(
    st.lists(
        st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([0.0, -0.0]),
        max_size=20,
    )
)
def test_sign_preserving_log1p_is_the_plain_formula_bit_for_bit(values: list[float]) -> None:
    feature = DenseFeature(column="views", transform="log1p")
    v = np.array(values, dtype=np.float64)
    expected = np.sign(v) * np.log1p(np.abs(v))
    assert elementwise(v, feature, "batch").tobytes() == expected.tobytes()  # -0.0 too


def test_a_group_column_that_is_also_a_feature_is_hashed_once(monkeypatch) -> None:
    """user_id is a categorical feature and the GAUC group key: one hash of the column
    gives both, equal to hashing it for each."""
    tasks = [{"name": "click", "group_column": "user_id"}, {"name": "like"}]
    pre = Preprocessor(_config(tasks=tasks))
    calls = []
    real = Hashed.of.__func__

    def counted(cls, values, key=FEATURE_KEY):
        calls.append(len(values))
        return real(cls, values, key)

    monkeypatch.setattr(Hashed, "of", classmethod(counted))
    out = pre.transform(_frame())
    assert len(calls) == 3  # user_id, device, and the multi-hot ids; not user_id again
    monkeypatch.undo()
    np.testing.assert_array_equal(out["group.user_id"], group_keys([1, 2, 3, 1]))
    np.testing.assert_array_equal(out["categorical"][:, 0], bucketize([1, 2, 3, 1], 1000))
