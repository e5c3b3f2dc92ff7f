"""bench/wellspec.py: the well-specified reference learner nearly reaches the oracle when
every id has plenty of rows, and is reproducible for a seed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.wellspec import wellspec_auc
from pipeline.datasets.synthetic import generate_logs


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200k rows over 40 users and 20 items: ~5,000 rows per user."""
    out = tmp_path_factory.mktemp("wellspec") / "logs"
    generate_logs(out, 200_000, seed=3, users=40, items=20)
    return out


def test_reaches_the_oracle_with_plenty_of_rows_per_id(logs: Path) -> None:
    result = wellspec_auc(logs, epochs=10)
    # Measured gaps: click .0023, like .0078, share .0066 (share has 304 test positives).
    assert result.oracle["click"] > 0.75 and result.oracle["like"] > 0.75
    assert result.gaps["click"] < 0.01
    assert result.gaps["like"] < 0.015
    assert result.gaps["share"] < 0.03
    assert 1 <= result.best_epoch <= 10


def test_is_reproducible(logs: Path) -> None:
    first = wellspec_auc(logs, epochs=2, seed=1)
    again = wellspec_auc(logs, epochs=2, seed=1)
    assert first.test == again.test and first.best_epoch == again.best_epoch
