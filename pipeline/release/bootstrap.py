"""The arithmetic of `adatt evaluate`, in parts that Ray workers compute on their own rows
and the driver merges exactly (pure numpy, no Ray).

The paired bootstrap by group: replicate r weights every row by a Poisson(1) count drawn
for the row's group (user). The count is a function of (seed, group key, r) only
(`replicate_counts`: SplitMix64 of the key, then the Poisson(1) quantile), so every worker
draws the same count for a user whatever the partitioning, and no table of users is ever
gathered. Replicate 0 weights every row 1: the point estimate.

Per replicate, each metric is a ratio of sums that split over any partition of the rows:

- NE and MSE: sums of count x (log loss | squared error | label | 1) over observed rows
  (`sums`).
- AUC: the rows sorted by score and cut into contiguous ranges (Ray Data's `sort`); each
  range gives its weighted pairs below (`auc_part`), and `merge_auc` adds the ranges in
  score order, ties across a cut counted half, exactly as one sorted pass would.
- GAUC: each group's AUC and rows (`group_auc`, one call per group), then sums of count x
  rows x AUC over the groups holding both classes (`gauc_sums`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_POISSON_CDF = np.cumsum([math.exp(-1.0) / math.factorial(k) for k in range(32)])
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
CLIP = 1e-7  # scores are clipped to [CLIP, 1 - CLIP] in the log loss


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def replicate_counts(keys: np.ndarray, seed: int, replicates: int) -> np.ndarray:
    """Each row's weight in each replicate, [replicates + 1, rows] float64: row 0 all ones,
    row r a Poisson(1) count that depends only on (seed, key, r).

    Example:
        >>> keys = np.array([7, 8, 7], dtype=np.int64)
        >>> c = replicate_counts(keys, seed=0, replicates=3)
        >>> c.shape, bool((c[:, 0] == c[:, 2]).all()), c[0].tolist()
        ((4, 3), True, [1.0, 1.0, 1.0])
    """
    keys = np.ascontiguousarray(keys, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):  # 64-bit arithmetic wraps on purpose
        base = np.uint64(seed) * _GOLDEN
    salts = _splitmix64(np.arange(1, replicates + 1, dtype=np.uint64) + base)
    mixed = _splitmix64(keys[None, :] ^ salts[:, None])
    uniform = (mixed >> np.uint64(11)).astype(np.float64) * 2.0**-53
    counts = np.searchsorted(_POISSON_CDF, uniform, side="right").astype(np.float64)
    return np.concatenate([np.ones((1, len(keys))), counts])


def sums(counts: np.ndarray, labels: np.ndarray, scores: np.ndarray, binary: bool) -> np.ndarray:
    """Per replicate, [2 + models, replicates + 1]: the weighted rows, the weighted labels,
    and per model the weighted log loss (binary) or squared error (regression), over the
    rows whose label is observed (`labels` NaN elsewhere; `scores` [models, rows])."""
    seen = np.isfinite(labels)
    c, y, s = counts[:, seen], labels[seen], scores[:, seen]
    if binary:
        p = np.clip(s, CLIP, 1 - CLIP)
        loss = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    else:
        loss = (s - y) ** 2
    return np.concatenate([c.sum(1)[None], (c @ y)[None], loss @ c.T])


@dataclass
class AucPart:
    """One contiguous score range's share of the weighted AUC, per replicate.

    Attributes:
        first, last: its lowest and highest score.
        positive, negative: its weighted positives and negatives.
        within: the weighted positive-negative pairs inside it (a negative below a positive
            counts 1, at the same score 1/2).
        first_pos, first_neg, last_pos, last_neg: the weights at its first and last score
            (for ties with the neighbouring ranges).
    """

    first: float
    last: float
    positive: np.ndarray
    negative: np.ndarray
    within: np.ndarray
    first_pos: np.ndarray
    first_neg: np.ndarray
    last_pos: np.ndarray
    last_neg: np.ndarray


def auc_part(counts: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> AucPart | None:
    """The `AucPart` of rows sorted by score (every label observed); None for no rows."""
    if len(scores) == 0:
        return None
    if len(scores) > 1 and np.any(scores[1:] < scores[:-1]):
        raise ValueError("auc_part: rows are not sorted by score")
    starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
    pos = np.add.reduceat(counts * labels, starts, axis=1)
    neg = np.add.reduceat(counts * (1.0 - labels), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    within = (pos * (below + 0.5 * neg)).sum(1)
    return AucPart(
        float(scores[0]), float(scores[-1]), pos.sum(1), neg.sum(1), within,
        pos[:, 0], neg[:, 0], pos[:, -1], neg[:, -1],
    )  # fmt: skip


def merge_auc(parts: list[AucPart | None]) -> np.ndarray:
    """The weighted AUC per replicate from the parts of disjoint contiguous score ranges
    (in any order); NaN where a replicate has no positive or no negative."""
    parts = sorted((p for p in parts if p is not None), key=lambda p: (p.first, p.last))
    if not parts:
        return np.array([np.nan])
    pairs = np.zeros_like(parts[0].within)
    below = np.zeros_like(pairs)  # negatives in the ranges merged so far
    # The highest score merged so far, and the positives and negatives at it.
    tie_score, tie_pos, tie_neg = None, np.zeros_like(pairs), np.zeros_like(pairs)
    for part in parts:
        if tie_score is not None and part.first < tie_score:
            raise ValueError("merge_auc: score ranges overlap; the rows were not range-sorted")
        pairs += part.within + part.positive * below
        if part.first == tie_score:  # pairs tied across the cut count 1/2: not 1, not 0
            pairs += 0.5 * (tie_pos * part.first_neg - part.first_pos * tie_neg)
        below += part.negative
        if part.first == part.last == tie_score:
            tie_pos, tie_neg = tie_pos + part.positive, tie_neg + part.negative
        else:
            tie_score, tie_pos, tie_neg = part.last, part.last_pos, part.last_neg
    positives = sum(p.positive for p in parts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(positives * below > 0, pairs / (positives * below), np.nan)


def group_auc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each model's AUC on one group's rows (ties half); NaN without both classes.
    `scores` is [models, rows]."""
    positives = labels.sum()
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return np.full(len(scores), np.nan)
    out = np.empty(len(scores))
    for i, s in enumerate(scores):
        order = np.argsort(s, kind="stable")
        ordered = s[order]
        tie = np.cumsum(np.r_[True, ordered[1:] != ordered[:-1]]) - 1
        rank = (np.bincount(tie, weights=np.arange(1.0, len(s) + 1)) / np.bincount(tie))[tie]
        out[i] = ((rank * labels[order]).sum() - positives * (positives + 1) / 2) / (
            positives * negatives
        )
    return out


def gauc_sums(counts: np.ndarray, rows: np.ndarray, aucs: np.ndarray) -> np.ndarray:
    """Per replicate, [1 + models, replicates + 1]: the weighted rows of the groups holding
    both classes, and per model the weighted rows x AUC (`aucs` [models, groups], NaN for a
    group with one class; `counts` [replicates + 1, groups])."""
    both = np.isfinite(aucs[0])
    weight = counts[:, both] * rows[both]
    return np.concatenate([weight.sum(1)[None], aucs[:, both] @ weight.T])
