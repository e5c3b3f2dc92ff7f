"""`bench.census_compare`: the paired before/after table of two Census ledgers."""

from __future__ import annotations

from pathlib import Path

from bench.census_compare import compare
from bench.census_report import RunResult, append_ledger
from pipeline.datasets.census import TASKS


def _run(seed: int, model: str, auc: float) -> RunResult:
    values = dict.fromkeys(TASKS, auc)
    return RunResult("experts6", model, seed, f"{model}{seed}{auc}", values, values, 10, 1.0)


def test_moves_are_paired_by_seed_and_cells_not_rerun_are_named(tmp_path: Path) -> None:
    before, after = tmp_path / "before.csv", tmp_path / "after.csv"
    for seed, auc in [(0, 0.90), (1, 0.92), (2, 0.50)]:
        append_ledger(before, _run(seed, "adatt", auc), 10)
    append_ledger(before, _run(0, "ple", 0.9), 10)
    for seed, auc in [(0, 0.91), (1, 0.95)]:  # seed 2 not rerun: left out of "before"
        append_ledger(after, _run(seed, "adatt", auc), 10)
    lines = compare(before, after)
    row = next(line for line in lines if f"| {TASKS[0]} |" in line)
    assert row.split(" | ")[3:7] == ["0.9100 ± 0.0141", "0.9300 ± 0.0283", "+0.0200", "2 |"]
    assert "| experts6 | PLE | | | not rerun | |" in lines
    assert lines[-1] == "max_abs_auc_move=0.0200"
