"""Synthetic logs: determinism, label rates, missing labels, oracle consistency, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.data.hashing import bucketize
from pipeline.data.validate import check_schema
from pipeline.datasets.synthetic import generate_logs

ROOT = Path(__file__).resolve().parents[3]
ROWS = 200_000


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("logs")
    generate_logs(out, ROWS, seed=7)
    return out, pd.read_parquet(sorted(out.glob("*.parquet")))


def test_files_per_day_and_row_count(logs: tuple[Path, pd.DataFrame]) -> None:
    out, df = logs
    files = sorted(p.name for p in out.glob("*.parquet"))
    assert len(files) == 14 and files[0] == "2024-01-01.parquet"
    assert len(df) == ROWS and df["event_id"].is_unique
    assert df["day"].nunique() == 14


def test_deterministic_per_seed(tmp_path: Path) -> None:
    generate_logs(tmp_path / "a", 5_000, seed=3, days=2)
    generate_logs(tmp_path / "b", 5_000, seed=3, days=2, threads=1)
    generate_logs(tmp_path / "c", 5_000, seed=4, days=2)
    a, b, c = (pd.read_parquet(sorted((tmp_path / n).glob("*.parquet"))) for n in "abc")
    pd.testing.assert_frame_equal(a, b)
    assert not a["click"].equals(c["click"])


def test_label_rates_and_missing_labels(logs: tuple[Path, pd.DataFrame]) -> None:
    _, df = logs
    clicked = df["click"] == 1
    assert 0.25 < clicked.mean() < 0.45
    for task in ("like", "share", "watch_time"):
        assert (df[task].notna() == clicked).all(), task  # observed exactly when clicked
    assert 0.25 < df.loc[clicked, "like"].mean() < 0.5
    share_overall = (df["share"] == 1).mean()
    assert 0.005 < share_overall < 0.02
    assert (df.loc[clicked, "watch_time"] > 0).all()


@pytest.mark.parametrize(
    ("task", "oracle"), [("click", "p_click"), ("like", "p_like"), ("share", "p_share")]
)
def test_oracle_matches_labels(logs: tuple[Path, pd.DataFrame], task: str, oracle: str) -> None:
    _, df = logs
    seen = df[df[task].notna()]
    auc = roc_auc_score(seen[task], seen[oracle])
    assert 0.7 < auc < 0.9, auc
    # Calibrated: the mean predicted probability matches the observed rate.
    assert seen[oracle].mean() == pytest.approx(seen[task].mean(), rel=0.05)


def test_watch_time_oracle_is_the_expectation(logs: tuple[Path, pd.DataFrame]) -> None:
    _, df = logs
    seen = df[df["watch_time"].notna()]
    assert seen["e_watch_time"].mean() == pytest.approx(seen["watch_time"].mean(), rel=0.02)
    assert np.corrcoef(seen["watch_time"], seen["e_watch_time"])[0, 1] > 0.5


def test_tasks_relate_and_conflict(logs: tuple[Path, pd.DataFrame]) -> None:
    _, df = logs
    seen = df[df["click"] == 1]
    assert np.corrcoef(seen["p_like"], seen["p_share"])[0, 1] > 0.3  # shared interest
    # Clickbait raises click but lowers watch time: per-item, the two disagree.
    items = seen.groupby("item_id")[["p_click", "e_watch_time"]].mean()
    assert items.corr().iloc[0, 1] < 0.1


def test_synthetic_config_fits_the_logs(logs: tuple[Path, pd.DataFrame]) -> None:
    out, df = logs
    cfg = load_config(ROOT / "configs" / "synthetic.yaml", [f"data.path={out}"])
    assert len(check_schema(cfg.data)) == 14
    # Small vocabularies are collision-free; large ones collide for at most 3 % of ids.
    for feature in cfg.data.categorical:
        values = df[feature.column].unique()
        ids = bucketize(values, feature.buckets)
        if len(values) <= 100:
            assert len(set(ids)) == len(values), feature.column
        else:
            assert len(set(ids)) >= 0.97 * len(values), feature.column
    tail = sorted(df["day"].unique())
    assert cfg.data.split.validation_from == tail[-2] and cfg.data.split.test_from == tail[-1]


def test_cli_generate(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["generate", "--out", str(tmp_path), "--rows", "3000", "--seed", "1", "--days", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "wrote 3,000 rows in 3 files" in result.output and "rows/s" in result.output
    assert len(pd.read_parquet(sorted(tmp_path.glob("*.parquet")))) == 3000
