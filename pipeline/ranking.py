"""Ranking and calibration arithmetic on numpy arrays: AUC per group (GAUC), weighted AUC,
entropy. Pure numpy, no torch or Ray: training's metrics and `adatt evaluate` share it.

GAUC: the AUC of each group's rows (a user's impressions), averaged with the group's number
of rows as its weight, over the groups that hold both classes, as TorchRec's and
TorchEasyRec's GAUC.
"""

from __future__ import annotations

import math

import numpy as np


def binary_entropy(rate: float) -> float:
    """Entropy (nats) of a Bernoulli(rate); 0 at rate 0 or 1."""
    if rate <= 0.0 or rate >= 1.0:
        return 0.0
    return -(rate * math.log(rate) + (1.0 - rate) * math.log(1.0 - rate))


def grouped_auc_sums(
    keys: np.ndarray, scores: np.ndarray, labels: np.ndarray
) -> tuple[float, float, int]:
    """Per-group AUC of 0/1 `labels` by `scores`, ties counted half (the Mann-Whitney U).

    Returns (sum over the groups with both classes of rows x AUC, sum of those rows, number
    of those groups); GAUC is the first divided by the second.

    Example:
        >>> grouped_auc_sums(np.array([7, 7, 7, 9, 9]), np.array([.9, .1, .5, .3, .4]),
        ...                  np.array([1, 0, 0, 1, 1]))
        (3.0, 3.0, 1)
    """
    _, auc, size = per_group_auc(keys, scores, labels)
    return float((auc * size).sum()), float(size.sum()), len(auc)


def per_group_auc(
    keys: np.ndarray, scores: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group keys, AUC, rows) of each group holding both classes, in key order."""
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    order = np.lexsort((scores, keys))
    keys, scores, labels = keys[order], scores[order], labels[order]
    starts = np.r_[True, keys[1:] != keys[:-1]]
    group = np.cumsum(starts) - 1
    rank = np.arange(len(keys)) - np.flatnonzero(starts)[group] + 1.0  # 1-based, in group
    # Tied scores within a group share the mean of their ranks.
    tie = np.cumsum(starts | np.r_[True, scores[1:] != scores[:-1]]) - 1
    rank = (np.bincount(tie, weights=rank) / np.bincount(tie))[tie]
    size = np.bincount(group).astype(np.float64)
    positives = np.bincount(group, weights=labels)
    negatives = size - positives
    positive_ranks = np.bincount(group, weights=rank * labels)
    both = (positives > 0) & (negatives > 0)
    p, n = positives[both], negatives[both]
    auc = (positive_ranks[both] - p * (p + 1) / 2) / (p * n)
    return keys[starts][both], auc, size[both]


def weighted_auc(order: np.ndarray, blocks: np.ndarray, labels: np.ndarray, w: np.ndarray) -> float:
    """AUC of `labels` with row weights `w`, ties counted half.

    `order` sorts the rows by score and `blocks` numbers the runs of equal scores in that
    order (`score_blocks`), so each bootstrap replicate costs two bincounts.
    """
    y, weight = labels[order], w[order]
    positive = np.bincount(blocks, weights=weight * y)
    negative = np.bincount(blocks, weights=weight * (1.0 - y))
    below = np.cumsum(negative) - negative
    total = positive.sum() * negative.sum()
    return float((positive * (below + 0.5 * negative)).sum() / total) if total > 0 else np.nan


def score_blocks(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the order sorting `scores`, the index of each sorted row's run of equal scores)."""
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    return order, np.cumsum(np.r_[True, ordered[1:] != ordered[:-1]]) - 1
