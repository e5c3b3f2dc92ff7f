"""bench/census.py: the grid's configs, and a tiny raw-format fixture through `--quick`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from bench.census import BENCH_CONFIG, load_spec, main, plan_jobs, training_config
from bench.census_report import finished_runs, read_ledger
from models import build_model
from pipeline.datasets.census import COLLEGE, COLUMNS

VOCAB = {
    "class_of_worker": ["Private", "Self-employed-incorporated", "Not in universe"],
    "education": [*sorted(COLLEGE), "High school graduate", "Children", "10th grade"],
    "marital_stat": ["Never married", "Married-civilian spouse present", "Divorced"],
    "race": ["White", "Black", "Asian or Pacific Islander"],
    "hispanic_origin": ["NA", "All other", "Mexican (Mexicano)"],
    "sex": ["Male", "Female"],
}
NUMERIC = {
    "age",
    "wage_per_hour",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "instance_weight",
    "num_persons_worked_for_employer",
    "weeks_worked_in_year",
}


def write_raw(folder: Path, train_rows: int = 300, test_rows: int = 200, seed: int = 0) -> Path:
    """Synthetic rows in the UCI format: 42 ", "-separated fields, labels that depend on
    the features (so every task has both classes and a learnable signal)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("census-income.data", train_rows), ("census-income.test", test_rows)):
        lines = []
        for _ in range(rows):
            age = int(rng.integers(0, 90))
            row = {}
            for column in COLUMNS[:-1]:
                if column in VOCAB:
                    row[column] = str(rng.choice(VOCAB[column]))
                elif column in NUMERIC:
                    row[column] = str(int(rng.integers(0, 5000)) if rng.random() < 0.3 else 0)
                else:
                    row[column] = str(rng.choice(["?", "Not in universe", "1", "2"]))
            row["age"] = str(age)
            rich = row["education"] in COLLEGE and rng.random() < 0.7
            row["income_label"] = "50000+." if rich or rng.random() < 0.1 else "- 50000."
            lines.append(", ".join(row[c] for c in COLUMNS))
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def test_fixture_has_the_uci_layout(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", train_rows=5, test_rows=3)
    rows = (raw / "census-income.data").read_text().splitlines()
    assert len(rows) == 5 and all(len(r.split(", ")) == 42 for r in rows)
    assert {r.split(", ")[-1] for r in rows} <= {"50000+.", "- 50000."}


def test_every_model_of_the_grid_builds(tmp_path: Path) -> None:
    spec = load_spec(BENCH_CONFIG)
    jobs = plan_jobs(list(spec.settings), list(spec.settings["experts6"].models), 2)
    assert [j.seed for j in jobs[:16]] == [0] * 16 and jobs[16].seed == 1  # seed-major
    for job in jobs[:16]:
        config = training_config(spec, BENCH_CONFIG, job, tmp_path / "d", tmp_path, 10)
        assert (config.train.lr, config.train.weight_decay, config.data.batch_size) == (
            1e-4,
            0.01,
            512,
        )
        assert config.model.name == spec.settings[job.setting].models[job.model]["name"]
        assert config.model.tower_dims == [32] and config.model.levels == 2
        build_model(config.model, config.data.feature_schema())
        two = training_config(
            spec, BENCH_CONFIG, job, tmp_path, tmp_path, 10, ["train.num_workers=2"]
        )
        assert two.data.batch_size == 256  # the global batch stays the paper's 512
        if job.model in ("adatt", "ple"):  # 3 tasks * m_t + m_s experts per level
            expected = 6 if job.setting == "experts6" else 9
            assert 3 * config.model.experts_per_task + config.model.shared_experts == expected


def test_missing_raw_files_skip_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "census.md"
    assert main(["--raw", str(tmp_path / "none"), "--out", str(out)]) == 0
    assert "skipped" in capsys.readouterr().out and not out.exists()


@pytest.mark.long
@pytest.mark.slow
def test_quick_run_writes_the_table(tmp_path: Path, ray_cluster: None) -> None:
    raw = write_raw(tmp_path / "raw")
    out = tmp_path / "results" / "census.md"
    args = ["--quick", "--raw", str(raw), "--workdir", str(tmp_path / "work"), "--out", str(out)]
    assert main([*args, "--models", "adatt", "--epochs", "1"]) == 0

    text = out.read_text()
    lines = text.splitlines()
    assert re.fullmatch(r"adatt_min_delta_vs_paper=-?\d\.\d{4}", lines[-1])
    runs = finished_runs(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}", "census-bench", 1)
    assert [(r.setting, r.model, r.seed) for r in runs] == [("experts6", "adatt", 0)]
    run = runs[0]
    # The table row holds that run's test AUCs, in the order of its validation AUCs.
    order = sorted(run.test, key=run.val.__getitem__)
    row = next(line for line in lines if line.startswith("| AdaTT |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "1"
    assert cells[2:8] == [
        f"{run.test[order[0]]:.4f} ± n/a",
        "0.8766",
        f"{run.test[order[1]]:.4f} ± n/a",
        "0.9202",
        f"{run.test[order[2]]:.4f} ± n/a",
        "0.9783",
    ]
    assert (
        lines[-1]
        == f"adatt_min_delta_vs_paper={min(run.test[order[0]] - 0.8766, run.test[order[1]] - 0.9202, run.test[order[2]] - 0.9783):.4f}"
    )
    table = [line.split("|")[1].strip() for line in lines if line.startswith("| ")]
    assert table == ["model", "---", "AdaTT"]
    assert (out.parent / "census-adatt-fusion-level1.png").stat().st_size > 1000
    assert (out.parent / "census-adatt-fusion-level2.png").is_file()
    # A second call reuses the finished run instead of training again.
    assert main([*args, "--models", "adatt", "--epochs", "1"]) == 0
    assert (
        len(finished_runs(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}", "census-bench", 1)) == 1
    )
    # The ledger beside the report holds the run; losing the tracking store loses no result.
    assert [r.run_id for r in read_ledger(out.parent / "census-runs.csv", 1)] == [run.run_id]
    (tmp_path / "work" / "mlflow.db").unlink()
    assert main([*args, "--models", "adatt", "--epochs", "1", "--report-only"]) == 0
    assert out.read_text().splitlines()[-1] == lines[-1]
    assert row in out.read_text().splitlines()
