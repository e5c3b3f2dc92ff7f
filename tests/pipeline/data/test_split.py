"""Split assignment: disjoint, complete, stable, with the configured fractions; file pruning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import SplitConfig
from pipeline.data.files import InputFiles
from pipeline.data.split import prune_files, split_mask, split_masks, split_names


def _masks(column, cfg: SplitConfig) -> dict[str, np.ndarray]:
    return {name: split_mask(column, cfg, name) for name in split_names(cfg)}


def test_hash_split_fractions_disjoint_and_stable() -> None:
    cfg = SplitConfig(method="hash", column="user_id", validation_fraction=0.1, test_fraction=0.2)
    users = np.arange(50_000)
    masks = _masks(users, cfg)
    stacked = np.stack(list(masks.values()))
    assert (stacked.sum(axis=0) == 1).all()  # every row in exactly one split
    assert masks["validation"].mean() == pytest.approx(0.1, abs=0.01)
    assert masks["test"].mean() == pytest.approx(0.2, abs=0.01)
    # Same key, same split, in any batch order or type.
    shuffled = np.random.default_rng(0).permutation(users)
    again = split_mask(shuffled.astype(np.int32), cfg, "test")
    assert (again == masks["test"][shuffled]).all()
    assert (split_mask([str(u) for u in users[:100]], cfg, "test") == masks["test"][:100]).all()


def test_hash_split_without_test() -> None:
    cfg = SplitConfig(validation_fraction=0.3)
    assert split_names(cfg) == ["train", "validation"]
    masks = _masks(np.arange(1000), cfg)
    assert (masks["train"] ^ masks["validation"]).all()


def test_values_split() -> None:
    cfg = SplitConfig(
        method="values", column="split", validation_values=["val"], test_values=["test"]
    )
    column = pa.array(["train", "val", "test", "other", None])
    masks = _masks(column, cfg)
    assert masks["train"].tolist() == [True, False, False, True, True]
    assert masks["validation"].tolist() == [False, True, False, False, False]
    assert masks["test"].tolist() == [False, False, True, False, False]
    strict = cfg.model_copy(update={"train_values": ["train"]})
    assert split_mask(column, strict, "train").tolist() == [True, False, False, False, False]


def test_values_split_on_int_column() -> None:
    cfg = SplitConfig(method="values", column="fold", validation_values=[3], test_values=["4"])
    masks = _masks(np.array([1, 3, 4], np.int16), cfg)
    assert [m.tolist() for m in masks.values()] == [
        [True, False, False],
        [False, True, False],
        [False, False, True],
    ]


def test_cutoff_split_on_strings_ints_and_dates() -> None:
    cfg = SplitConfig(
        method="cutoff", column="day", validation_from="2024-01-13", test_from="2024-01-14"
    )
    days = ["2024-01-01", "2024-01-12", "2024-01-13", "2024-01-14", None]
    expected = {
        "train": [True, True, False, False, False],
        "validation": [False, False, True, False, False],
        "test": [False, False, False, True, False],
    }
    assert {k: v.tolist() for k, v in _masks(days, cfg).items()} == expected
    dates = pa.array(days).cast(pa.date32())
    assert {k: v.tolist() for k, v in _masks(dates, cfg).items()} == expected
    ints = SplitConfig(method="cutoff", column="t", validation_from=10, test_from="20")
    masks = _masks(np.array([5, 10, 19, 20, 99]), ints)
    assert masks["validation"].tolist() == [False, True, True, False, False]


def test_prune_files_uses_statistics(tmp_path: Path) -> None:
    paths = []
    for day in ["2024-01-01", "2024-01-02", "2024-01-03"]:
        path = tmp_path / f"{day}.parquet"
        pq.write_table(pa.table({"day": [day] * 3, "x": [1, 2, 3]}), path)
        paths.append(str(path))
    files = InputFiles.read(paths)
    cutoff = SplitConfig(
        method="cutoff", column="day", validation_from="2024-01-02", test_from="2024-01-03"
    )
    assert prune_files(cutoff, files, "train") == paths[:1]
    assert prune_files(cutoff, files, "validation") == paths[1:2]
    assert prune_files(cutoff, files, "test") == paths[2:]
    values = SplitConfig(method="values", column="day", validation_values=["2024-01-03"])
    assert prune_files(values, files, "validation") == paths[2:]
    assert prune_files(values, files, "train") == paths[:2]
    assert prune_files(SplitConfig(column="day"), files, "validation") == paths


def test_a_salt_draws_other_users_for_the_holdout() -> None:
    """`adatt retrain` salts the split with the day: each day holds out other users
    (independent draws overlap by about test_fraction squared), the same day the same."""
    users = np.arange(50_000)

    def holdout(salt: str) -> np.ndarray:
        cfg = SplitConfig(column="user_id", salt=salt, validation_fraction=0.1, test_fraction=0.2)
        return split_mask(users, cfg, "test")

    monday, tuesday = holdout("holdout 2024-01-15"), holdout("holdout 2024-01-16")
    assert monday.mean() == pytest.approx(0.2, abs=0.01)
    assert (monday & tuesday).mean() == pytest.approx(0.2 * 0.2, abs=0.005)
    assert (holdout("holdout 2024-01-15") == monday).all()
    assert not (holdout("") == monday).all()  # the unsalted split of plain training differs


SPLITS_OF_TEXT = [
    SplitConfig(method="hash", column="day", validation_fraction=0.3, test_fraction=0.2),
    SplitConfig(method="values", column="day", validation_values=["b"], test_values=["c"]),
    SplitConfig(method="values", column="day", validation_values=["b"], train_values=["a", "d"]),
    SplitConfig(method="cutoff", column="day", validation_from="b", test_from="c"),
    SplitConfig(method="cutoff", column="day", validation_from="c"),
]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d", "ee"])), max_size=40),
    st.sampled_from(range(len(SPLITS_OF_TEXT))),
)
def test_a_column_read_as_its_dictionary_splits_as_its_text(values, which) -> None:
    """The feed reads a small string split column as its Parquet dictionary: every row's
    split is the one its text gives, nulls included (a null index, or a null entry)."""
    cfg = SPLITS_OF_TEXT[which]
    names = split_names(cfg)
    text = pa.array(values, pa.string())
    plain = split_masks(text, cfg, names)
    encoded = text.dictionary_encode()  # nulls as null indices
    with_null_entry = pa.DictionaryArray.from_arrays(  # a null as an entry of its own
        pa.array([4 if v is None else "abcd".index(v) if len(v) == 1 else 5 for v in values],
                 pa.int32()),
        pa.array(["a", "b", "c", "d", None, "ee"]),
    )  # fmt: skip
    for column in (encoded, with_null_entry, pa.chunked_array([encoded])):
        masks = split_masks(column, cfg, names)
        for name in names:
            assert masks[name].tolist() == plain[name].tolist(), (name, column.type)


def test_int8_indices_of_a_128_entry_dictionary_split_as_their_text() -> None:
    """A null row is placed after the dictionary's entries even where that index does not
    fit the indices' type (int8, 128 entries)."""
    days = [f"2024-{i // 28 + 1:02d}-{i % 28 + 1:02d}" for i in range(128)]
    indices = pa.array([0, None, 100, 127], pa.int8())
    column = pa.DictionaryArray.from_arrays(indices, pa.array(days))
    cfg = SplitConfig(method="cutoff", column="day", validation_from=days[100])
    masks = split_masks(column, cfg, ["train", "validation"])
    assert masks["train"].tolist() == [True, False, False, False]
    assert masks["validation"].tolist() == [False, False, True, True]
