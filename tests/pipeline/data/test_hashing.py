"""Stable hashing: same ids in every process, for every int width, ints and strings alike."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from pipeline.data import hashing
from pipeline.data.hashing import FEATURE_KEY, bucketize, group_keys, stable_hash, unit_interval

# Pinned: a change here silently remaps every trained embedding row.
PINNED = {5: 4610244961996097042, "a": 8674835363183471217, None: 12355657622114619020}


def test_pinned_values() -> None:
    assert stable_hash([5, None]).tolist() == [PINNED[5], PINNED[None]]
    assert stable_hash(["a"]).tolist() == [PINNED["a"]]


def test_same_hash_in_a_fresh_process() -> None:
    code = (
        "from pipeline.data.hashing import stable_hash; print(stable_hash(['a', 'b', 7]).tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == str(stable_hash(["a", "b", "7"]).tolist())


def test_int_widths_strings_and_containers_agree() -> None:
    values = [0, 7, 120, -3]
    expected = stable_hash(np.array(values, np.int64))
    for dtype in (np.int8, np.int16, np.int32):
        assert (stable_hash(np.array(values, dtype)) == expected).all()
    assert (stable_hash([str(v) for v in values]) == expected).all()
    assert (stable_hash(pa.array(values, pa.int16())) == expected).all()
    assert (stable_hash(pd.Series(values)) == expected).all()
    assert (stable_hash(np.array(values, np.float64)) == expected).all()
    chunked = pa.chunked_array([pa.array(values[:2]), pa.array(values[2:])])
    assert (stable_hash(chunked) == expected).all()
    dictionary = pa.array([str(v) for v in values]).dictionary_encode()
    assert (stable_hash(dictionary) == expected).all()


def test_pandas_nulls_hash_like_arrow_nulls() -> None:
    assert stable_hash(pd.Series([1.0, np.nan]))[1] == PINNED[None]
    assert stable_hash(pd.Series(["x", None], dtype="str"))[1] == PINNED[None]


@given(st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=50), st.integers(1, 10**6))
def test_buckets_in_range_and_deterministic(values: list[int], buckets: int) -> None:
    ids = bucketize(values, buckets)
    assert ids.dtype == np.int64
    assert ((ids >= 0) & (ids < buckets)).all()
    assert (ids == bucketize(list(values), buckets)).all()


def test_unit_interval_is_uniform_and_independent_of_feature_hash() -> None:
    u = unit_interval(np.arange(100_000))
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.01
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 9_500
    # The split key is hashed under another key, so split and bucket are unrelated.
    buckets = bucketize(np.arange(100_000), 2)
    assert abs(np.corrcoef(u, buckets)[0, 1]) < 0.02


def test_arrow_backed_pandas_hashes_like_plain_values() -> None:
    """Ray Data's pandas batches can hold Arrow-backed columns (a ChunkedArray inside)."""
    chunked = pa.chunked_array([[1, None, 3], [4]])
    series = chunked.to_pandas(types_mapper=pd.ArrowDtype)
    assert (stable_hash(series) == stable_hash([1, None, 3, 4])).all()
    assert (group_keys(series) == group_keys(chunked)).all()


def test_texts_hash_as_pandas_hashes_their_python_strings() -> None:
    """The texts are hashed as UTF-8 bytes; pandas hashes a str by its UTF-8 encoding, so
    ids, non-ASCII strings and the null text keep the hashes they had as str objects."""
    values = ["é", "日本", "a", "12345678901234567890", "", None]
    as_str = np.array([*values[:-1], "\x00null"], dtype=object)
    expected = pd.util.hash_array(as_str, hash_key=FEATURE_KEY, categorize=False)
    assert stable_hash(values).tolist() == expected.tolist()
    ids = np.arange(-5, 200_000, 7)
    expected = pd.util.hash_array(
        ids.astype(str).astype(object), hash_key=FEATURE_KEY, categorize=False
    )
    assert (stable_hash(ids) == expected).all()


_texts = st.lists(
    st.one_of(st.none(), st.sampled_from(["a", "b", "é", "", "12", "日本"])), max_size=40
)


@given(_texts, st.integers(1, 50))
def test_dictionary_encoded_values_hash_as_their_values(values: list, buckets: int) -> None:
    """Strings read from Parquet as their dictionary (`feed.dictionary_columns`) hash, bucket
    and group as the strings do: in one chunk or chunks of different dictionaries, with a
    dictionary that repeats a value or holds a null."""
    plain = pa.array(values, pa.string())
    encoded = plain.dictionary_encode()
    half = len(values) // 2
    chunked = pa.chunked_array([plain[:half].dictionary_encode(), plain[half:].dictionary_encode()])
    # A dictionary with a null entry and a repeated value, rows pointing at both.
    dictionary = pa.array([None, "a", "b", "é", "", "12", "日本", "a"], pa.string())
    index = {None: 0, "a": 7, "b": 2, "é": 3, "": 4, "12": 5, "日本": 6}
    odd = pa.DictionaryArray.from_arrays(
        pa.array([index[v] for v in values], pa.int8()), dictionary
    )
    want = stable_hash(values)
    for variant in (encoded, chunked, odd):
        assert (stable_hash(variant) == want).all()
        assert (bucketize(variant, buckets, 3) == bucketize(values, buckets, 3)).all()
        assert (group_keys(variant) == group_keys(values)).all()
    ints = pa.array([None if v is None else len(v) for v in values], pa.int64())
    assert (stable_hash(ints.dictionary_encode()) == stable_hash(ints)).all()


@given(
    st.lists(st.integers(0, 9_999), max_size=30),
    st.sampled_from([pa.int64(), pa.int32(), pa.string(), pa.float64()]),
    st.integers(1, 10**6),
)
def test_mostly_distinct_batches_hash_row_by_row_as_in_small_batches(
    nulls: list[int], kind: pa.DataType, buckets: int
) -> None:
    """A batch of nearly all distinct ids is hashed row by row (`_mostly_distinct`), without
    finding its distinct values first; its rows get the hashes, buckets and group keys they
    get in small batches, which find them first: nulls, repeats and negative ids included."""
    values = np.arange(10_000) * 7_919 - 50_000
    values[::97] = 42  # a repeated value among the distinct ones
    column = pa.array(values, mask=np.isin(np.arange(10_000), nulls)).cast(kind)
    assert hashing._mostly_distinct(column)
    small = [column[i : i + 100] for i in range(0, 10_000, 100)]
    assert not any(hashing._mostly_distinct(part) for part in small)
    assert (stable_hash(column) == np.concatenate([stable_hash(p) for p in small])).all()
    want = np.concatenate([bucketize(p, buckets, 1) for p in small])
    assert (bucketize(column, buckets, 1) == want).all()
    assert (group_keys(column) == np.concatenate([group_keys(p) for p in small])).all()
    assert (stable_hash(column)[nulls] == PINNED[None]).all()


def test_batches_of_few_distinct_values_find_them_first() -> None:
    """A large batch of a few thousand distinct ids hashes only those (`dictionary_encode`);
    its sample shows the repeats."""
    ids = pa.array(np.random.default_rng(0).integers(0, 2_000, 131_072))
    assert not hashing._mostly_distinct(ids)
    assert hashing._mostly_distinct(pa.array(np.arange(131_072)))
