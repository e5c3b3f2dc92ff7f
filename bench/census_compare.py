"""Census test AUC before and after a model change: two ledgers, the cells of the first.

    python -m bench.census_compare docs/results/census-runs-before-fidelity.csv \
        docs/results/census-runs.csv

Prints a markdown table: per (setting, model) of the `before` ledger and per task, the mean
test AUC ± sample std over the seeds both ledgers hold (paired: the same seeds before and
after), and after minus before; then the largest move over every cell and task
(`max_abs_auc_move=`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.census_report import NAMES, Cell, group, read_ledger
from pipeline.datasets.census import TASKS


def compare(before: Path, after: Path, epochs: int = 10) -> list[str]:
    """The table's lines."""
    old, new = group(read_ledger(before, epochs)), group(read_ledger(after, epochs))
    lines = [
        "| setting | model | task | before | after | after - before | seeds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    moves = []
    for key in sorted(old):
        setting, model = key
        if key not in new:
            lines.append(f"| {setting} | {NAMES.get(model, model)} | | | not rerun | |")
            continue
        seeds = {r.seed for r in new[key].runs}
        a, b = Cell([r for r in old[key].runs if r.seed in seeds]), new[key]
        for task in TASKS:
            delta = b.mean(task) - a.mean(task)
            moves.append(abs(delta))
            lines.append(
                f"| {setting} | {NAMES.get(model, model)} | {task} "
                f"| {a.mean(task):.4f} ± {a.std(task):.4f} | {b.mean(task):.4f} ± {b.std(task):.4f} "
                f"| {delta:+.4f} | {len(b.runs)} |"
            )
    lines.append("")
    lines.append(f"max_abs_auc_move={max(moves):.4f}" if moves else "max_abs_auc_move=nan")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    print("\n".join(compare(args.before, args.after, args.epochs)))


if __name__ == "__main__":
    main()
