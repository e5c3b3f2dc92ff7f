"""bench/census_report.py: grouping, the paper's column order, deltas and the markdown table."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.census_report import (
    FIGURES_RUN,
    Cell,
    RunResult,
    append_ledger,
    comparison_lines,
    copy_fusion_figures,
    group,
    min_delta,
    missing_lines,
    paper_adatt,
    paper_task_order,
    read_ledger,
    setting_table,
)

PAPER = {"adatt": [0.87, 0.92, 0.97], "ple": [0.86, 0.91, 0.96]}


def run(model: str, seed: int, shift: float, setting: str = "experts6") -> RunResult:
    """Validation/test AUC levels college < income < never_married, moved by `shift`."""
    levels = {"income": 0.93, "never_married": 0.99, "college": 0.88}
    val = {t: v + shift for t, v in levels.items()}
    test = {t: v + shift + 0.001 * seed for t, v in levels.items()}
    return RunResult(setting, model, seed, f"{model}-{seed}", val, test, 5 + seed, 100.0)


def test_group_keeps_one_run_per_seed_latest_wins() -> None:
    runs = [run("adatt", 0, 0.0), run("adatt", 1, 0.0), run("adatt", 0, 0.01)]
    cells = group(runs)
    assert list(cells) == [("experts6", "adatt")]
    cell = cells[("experts6", "adatt")]
    assert [r.seed for r in cell.runs] == [0, 1]
    assert cell.mean("income") == pytest.approx((0.94 + 0.931) / 2)
    assert cell.std("income") == pytest.approx(abs(0.94 - 0.931) / math.sqrt(2))
    assert math.isnan(Cell([run("ple", 0, 0.0)]).std("income"))


def test_paper_order_follows_validation_levels() -> None:
    cells = group([run("adatt", 0, 0.0), run("ple", 0, -0.01)])
    order, agree, total = paper_task_order(cells)
    assert order == ["college", "income", "never_married"]
    assert (agree, total) == (2, 2)


def test_compared_adatt_is_chosen_on_validation_and_delta_is_the_worst_task() -> None:
    cells = group([run("adatt", 0, -0.02), run("adatt_sp", 0, 0.005), run("ple", 0, 0.0)])
    assert paper_adatt(cells, "experts6") == "adatt_sp"
    assert paper_adatt(cells, "experts9") is None
    order = ["college", "income", "never_married"]
    # adatt_sp test: .885, .935, .995 vs paper .87, .92, .97 -> worst is +.015
    assert min_delta(cells, {"experts6": PAPER}, order) == pytest.approx(0.015)
    assert math.isnan(min_delta(cells, {"experts9": PAPER}, order))


def test_table_rows_and_comparisons() -> None:
    cells = group([run("adatt", 0, 0.0), run("adatt", 1, 0.0), run("ple", 0, -0.01)])
    order = ["college", "income", "never_married"]
    lines = setting_table(cells, "experts6", ["adatt", "ple", "mmoe"], order, PAPER)
    assert len(lines) == 4  # header, separator, AdaTT, PLE (no MMoE runs)
    assert lines[2].startswith("| AdaTT | 2 | 0.8805 ± 0.0007 | 0.8700 | 0.9305 ± 0.0007 |")
    assert lines[2].endswith("| 5,6 | 100 |")
    assert lines[3].startswith("| PLE | 1 | 0.8700 ± n/a | 0.8600 |")
    text = "\n".join(comparison_lines(cells, "experts6", order, PAPER))
    assert "target >= 0 on every task: reached" in text
    assert "AdaTT minus PLE (ours): college +0.0105" in text and "ahead on 3/3" in text
    assert "(paper: +0.0100, +0.0100, +0.0100)" in text


def test_missing_cells_and_failures_are_listed() -> None:
    from bench.census import plan_jobs

    cells = group([run("adatt", 0, 0.0), run("adatt", 1, 0.0), run("ple", 0, 0.0)])
    assert missing_lines(cells, plan_jobs(["experts6"], ["adatt"], 2), []) == []
    lines = missing_lines(cells, plan_jobs(["experts6"], ["adatt", "ple", "mmoe"], 2), ["x: boom"])
    assert (
        lines[2]
        == "Requested but not (fully) run: experts6 PLE: 1/2 seeds; experts6 MMoE: 0/2 seeds."
    )
    assert lines[3] == "- failed: x: boom"


def test_ledger_round_trips_runs_and_names_a_bad_row(tmp_path: Path) -> None:
    ledger = tmp_path / "results" / "census-runs.csv"
    first, second = run("adatt", 0, 0.0), run("ple", 1, -0.01)
    append_ledger(ledger, first, 10)
    append_ledger(ledger, second, 10)
    append_ledger(ledger, run("mmoe", 0, 0.0), 3)  # another epoch count: not this report's
    assert read_ledger(ledger, 10) == [first, second]
    assert [r.model for r in read_ledger(ledger, 3)] == ["mmoe"]
    assert read_ledger(tmp_path / "none.csv", 10) == []
    with ledger.open("a") as handle:
        handle.write("id,experts6,adatt,zero,10,1,1.0,.9,.9,.9,.9,.9,.9\n")
    with pytest.raises(ValueError, match=r"census-runs.csv:5: malformed ledger row"):
        read_ledger(ledger, 10)


def test_committed_fusion_figures_outlive_the_tracking_store(tmp_path: Path) -> None:
    best, other = run("adatt", 0, 0.01), run("adatt_sp", 1, 0.0)
    cells = group([best, other, run("ple", 0, 0.02)])
    # Nothing stored and no figures on disk: nothing to show.
    assert copy_fusion_figures("sqlite:///unused.db", cells, tmp_path, set()) is None
    figure = tmp_path / "census-adatt-fusion-level1.png"
    figure.write_bytes(b"png")
    (tmp_path / FIGURES_RUN).write_text(best.run_id + "\n")
    kept = copy_fusion_figures("sqlite:///unused.db", cells, tmp_path, set())
    assert kept == (best, [figure])
    # A marker naming a run the report does not hold does not pass off its figures.
    (tmp_path / FIGURES_RUN).write_text("some-other-run\n")
    assert copy_fusion_figures("sqlite:///unused.db", cells, tmp_path, set()) is None
