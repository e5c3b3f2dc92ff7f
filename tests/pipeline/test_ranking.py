"""The ranking arithmetic against scikit-learn: weighted AUC with ties, per-group AUC."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.ranking import per_group_auc, score_blocks, weighted_auc


def test_weighted_auc_equals_sklearn_with_sample_weights_and_ties() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(2000), 2)  # many ties
    labels = (rng.random(2000) < scores).astype(np.float64)
    weights = rng.poisson(1.0, 2000).astype(np.float64)  # a bootstrap replicate: zeros too
    order, blocks = score_blocks(scores)
    got = weighted_auc(order, blocks, labels, weights)
    assert got == pytest.approx(roc_auc_score(labels, scores, sample_weight=weights), abs=1e-12)
    ones = np.ones_like(weights)
    assert weighted_auc(order, blocks, labels, ones) == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-12
    )
    assert np.isnan(weighted_auc(order, blocks, np.zeros(2000), ones))  # one class


def test_per_group_auc_keeps_groups_with_both_classes() -> None:
    keys = np.array([3, 3, 3, 5, 5, 8, 8])
    scores = np.array([0.2, 0.9, 0.4, 0.5, 0.5, 0.1, 0.7])
    labels = np.array([0, 1, 1, 1, 1, 1, 0.0])
    kept, auc, size = per_group_auc(keys, scores, labels)
    assert kept.tolist() == [3, 8] and size.tolist() == [3, 2]
    assert auc.tolist() == [1.0, 0.0]
