"""Census-Income conversion: parser on a fixture in raw UCI format, and on the real files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.data.fit import fit_preprocessor
from pipeline.data.validate import check_schema
from pipeline.datasets.census import COLUMNS, convert_census
from pipeline.errors import InputError

ROOT = Path(__file__).resolve().parents[3]
# ../shared/data relative to the repository root: the worktree's sibling or a clone's parent.
RAW = ROOT.parent / "shared" / "data" / "census-income"

ROW = (
    "{age}, Private, 4, 34, {education}, 0, Not in universe, {marital}, Construction, "
    "Precision production craft & repair, White, {hispanic}, Male, Not in universe, "
    "Not in universe, Children or Armed Forces, {gains}, 0, 0, Head of household, South, "
    "Arkansas, Householder, Householder, 1053.55, ?, ?, ?, Not in universe under 1 year old, "
    "?, 1, Not in universe, United-States, United-States, United-States, "
    "Native- Born in the United States, 0, Not in universe, 2, 52, 95, {label}"
)


def _row(i: int) -> str:
    return ROW.format(
        age=20 + i,
        education=["Bachelors degree(BA AB BS)", "High school graduate", "Children"][i % 3],
        marital=["Never married", "Divorced"][i % 2],
        hispanic=["NA", "All other"][i % 2],
        gains=[0, 15024][i % 2],
        label=["- 50000.", "50000+."][i % 2],
    )


@pytest.fixture
def raw_dir(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "census-income.data").write_text("\n".join(_row(i) for i in range(12)) + "\n")
    (raw / "census-income.test").write_text("\n".join(_row(i) for i in range(12, 22)) + "\n")
    return raw


def test_fixture_row_has_42_fields() -> None:
    assert len(_row(0).split(", ")) == len(COLUMNS) == 42
    assert COLUMNS[24] == "instance_weight"


def test_convert_fixture(raw_dir: Path, tmp_path: Path) -> None:
    config_path = convert_census(raw_dir, tmp_path / "out", seed=1)
    df = pd.read_parquet([tmp_path / "out" / "train.parquet", tmp_path / "out" / "test.parquet"])
    assert len(df) == 22
    assert df["split"].value_counts().to_dict() == {"train": 12, "validation": 5, "test": 5}
    assert df["income"].tolist() == [i % 2 for i in range(22)]
    assert df["never_married"].tolist() == [1 - i % 2 for i in range(22)]
    assert df["college"].tolist() == [int(i % 3 == 0) for i in range(22)]
    assert set(df["hispanic_origin"]) == {"NA", "All other"}  # "NA" read literally
    assert df["instance_weight"].iloc[0] == pytest.approx(1053.55)
    assert not {"income_label", "marital_stat", "education"} & set(df.columns)

    cfg = load_config(config_path)
    features = set(cfg.data.feature_columns)
    assert len(features) == 38 and "instance_weight" not in features and "split" not in features
    assert not features & {"income", "never_married", "college"}
    assert [t.name for t in cfg.data.tasks] == ["income", "never_married", "college"]
    files = check_schema(cfg.data)
    stats = fit_preprocessor(cfg.data, files).dense_stats
    assert stats["age"].count == 12 and stats["age"].mean == pytest.approx(25.5)


def test_halving_is_seeded(raw_dir: Path, tmp_path: Path) -> None:
    def halves(seed: int, out: str) -> list[str]:
        convert_census(raw_dir, tmp_path / out, seed=seed)
        return pd.read_parquet(tmp_path / out / "test.parquet")["split"].tolist()

    assert halves(1, "a") == halves(1, "b")
    assert halves(1, "a") != halves(2, "c")


def test_bad_raw_files(raw_dir: Path, tmp_path: Path) -> None:
    (raw_dir / "census-income.test").write_text(_row(0).replace("- 50000.", "maybe") + "\n")
    with pytest.raises(InputError, match="census-income.test.*'income_label'"):
        convert_census(raw_dir, tmp_path / "out")
    (raw_dir / "census-income.test").unlink()
    with pytest.raises(InputError, match="census-income.test.gz found"):
        convert_census(raw_dir, tmp_path / "out")


def test_cli(raw_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["data", "census", "--raw", str(raw_dir), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "census.yaml").is_file()
    result = CliRunner().invoke(app, ["data", "census", "--raw", str(tmp_path), "--out", "x"])
    assert result.exit_code == 2 and "census-income.data" in result.output


@pytest.mark.census
@pytest.mark.skipif(not RAW.is_dir(), reason=f"raw Census-Income files not in {RAW}")
def test_real_files(tmp_path: Path) -> None:
    cfg = load_config(convert_census(RAW, tmp_path))
    df = pd.read_parquet([tmp_path / "train.parquet", tmp_path / "test.parquet"])
    assert df["split"].value_counts().to_dict() == {
        "train": 199_523,
        "validation": 49_881,
        "test": 49_881,
    }
    train = df[df["split"] == "train"]
    assert train["income"].sum() == 12_382  # UCI's count of 50000+ in the train file
    assert train["never_married"].mean() == pytest.approx(0.4335, abs=0.001)
    assert train["college"].mean() == pytest.approx(0.1477, abs=0.001)
    assert (df["hispanic_origin"] == "NA").sum() > 0
    assert len(check_schema(cfg.data)) == 2
