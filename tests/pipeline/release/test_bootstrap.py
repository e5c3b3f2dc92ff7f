"""The arithmetic `adatt evaluate` runs on the workers, against the exact single-host
computation it replaced (one table of every row on the driver): every metric of every
replicate equal to 1e-9, whatever the partitioning; Poisson counts drawn from the user key
alone."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.ranking import binary_entropy, per_group_auc, score_blocks, weighted_auc
from pipeline.release import bootstrap as bs

REPLICATES = 30


def _reference(keys, labels, scores, counts):
    """The driver-side computation `adatt evaluate` used before (one model): per replicate
    AUC, GAUC and NE from whole arrays, rows weighted by their user's count."""
    distinct, group_of_row = np.unique(keys, return_inverse=True)
    order, blocks = score_blocks(scores)
    kept, auc, size = per_group_auc(group_of_row, scores, labels)
    p = np.clip(scores, bs.CLIP, 1 - bs.CLIP)
    logloss = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    out = []
    for replicate in counts:
        w = replicate
        group_counts = np.zeros(len(distinct))
        group_counts[group_of_row] = w  # every row of a user carries the user's count
        weight = group_counts[kept] * size
        rate = (w * labels).sum() / w.sum()
        out.append(
            {
                "auc": weighted_auc(order, blocks, labels, w),
                "gauc": (weight * auc).sum() / weight.sum(),
                "ne": ((w * logloss).sum() / w.sum()) / binary_entropy(rate),
            }
        )
    return out


@pytest.fixture(scope="module")
def holdout():
    rng = np.random.default_rng(3)
    rows = 4000
    keys = rng.integers(0, 150, rows).astype(np.int64) * 7919 - 500_000  # negative keys too
    labels = (rng.random(rows) < 0.35).astype(np.float64)
    scores = np.round(np.clip(0.3 * labels + rng.random(rows) * 0.7, 0, 1), 3)  # many ties
    return keys, labels, scores


def _merged(keys, labels, scores, cuts):
    """The workers' parts over a partition of the rows, merged as the driver does."""
    counts = bs.replicate_counts(keys, seed=11, replicates=REPLICATES)
    sums = sum(bs.sums(counts[:, a:b], labels[a:b], scores[None, a:b], True) for a, b in cuts)
    order = np.argsort(scores, kind="stable")
    ranges = [order[a:b] for a, b in cuts]  # contiguous score ranges of the sorted rows
    parts = [bs.auc_part(counts[:, r], labels[r], scores[r]) for r in ranges]
    groups = {}
    for key in np.unique(keys):
        mine = keys == key
        groups[key] = (mine.sum(), bs.group_auc(labels[mine], scores[None, mine])[0])
    group_keys = np.array(list(groups))
    rows_of = np.array([groups[k][0] for k in group_keys], dtype=np.float64)
    auc_of = np.array([[groups[k][1] for k in group_keys]])
    # Groups split among "workers" in another partition again.
    gauc = sum(
        bs.gauc_sums(
            bs.replicate_counts(group_keys[a:b], 11, REPLICATES), rows_of[a:b], auc_of[:, a:b]
        )
        for a, b in [(0, 40), (40, 41), (41, len(group_keys))]
    )
    with np.errstate(invalid="ignore"):
        entropy = np.array([binary_entropy(r) for r in sums[1] / sums[0]])
    return counts, {
        "auc": bs.merge_auc(parts),
        "gauc": gauc[1] / gauc[0],
        "ne": (sums[2] / sums[0]) / entropy,
    }


@pytest.mark.parametrize("pieces", [1, 2, 7, 60])
def test_parts_merge_to_the_single_host_result(holdout, pieces: int) -> None:
    keys, labels, scores = holdout
    edges = np.linspace(0, len(keys), pieces + 1).astype(int)
    cuts = list(zip(edges[:-1], edges[1:], strict=True))
    counts, merged = _merged(keys, labels, scores, cuts)
    reference = _reference(keys, labels, scores, counts)
    assert counts[0].tolist() == [1.0] * len(keys)  # replicate 0: the point estimate
    for metric in ("auc", "gauc", "ne"):
        expected = np.array([r[metric] for r in reference])
        np.testing.assert_allclose(merged[metric], expected, rtol=0, atol=1e-9, err_msg=metric)


@settings(max_examples=40, deadline=None)
@given(
    keys=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=30),
    seed=st.integers(0, 2**31),
    data=st.data(),
)
def test_a_users_counts_depend_on_its_key_alone(keys, seed, data) -> None:
    keys = np.array(keys, dtype=np.int64)
    order = np.array(data.draw(st.permutations(range(len(keys)))))
    counts = bs.replicate_counts(keys, seed, 8)
    shuffled = bs.replicate_counts(keys[order], seed, 8)
    np.testing.assert_array_equal(shuffled, counts[:, order])  # any partitioning, any order
    alone = np.concatenate(
        [bs.replicate_counts(keys[i : i + 1], seed, 8) for i in range(len(keys))], axis=1
    )
    np.testing.assert_array_equal(alone, counts)


def test_counts_are_poisson_one() -> None:
    counts = bs.replicate_counts(np.arange(200_000, dtype=np.int64), seed=0, replicates=3)[1:]
    assert counts.mean() == pytest.approx(1.0, abs=0.01)
    assert counts.var() == pytest.approx(1.0, abs=0.02)
    assert (counts == 0).mean() == pytest.approx(np.exp(-1), abs=0.005)


def test_unsorted_or_overlapping_ranges_are_refused() -> None:
    counts = np.ones((1, 3))
    with pytest.raises(ValueError, match="not sorted"):
        bs.auc_part(counts, np.array([1.0, 0, 1]), np.array([0.3, 0.1, 0.2]))
    low = bs.auc_part(counts, np.array([1.0, 0, 1]), np.array([0.1, 0.5, 0.6]))
    high = bs.auc_part(counts, np.array([1.0, 0, 1]), np.array([0.2, 0.3, 0.9]))
    with pytest.raises(ValueError, match="overlap"):
        bs.merge_auc([low, high])
