"""`adatt generate` and `adatt data census`: interaction logs to train on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def generate(
    out: Annotated[Path, typer.Option("--out", help="Output folder for the Parquet logs.")],
    rows: Annotated[int, typer.Option("--rows", min=1, help="Number of rows.")] = 1_000_000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    days: Annotated[int, typer.Option("--days", min=1, help="Days (one file each).")] = 14,
    users: Annotated[int, typer.Option("--users", min=1)] = 2_000,
    items: Annotated[int, typer.Option("--items", min=1)] = 1_000,
    start_day: Annotated[
        str, typer.Option("--start-day", help="First day (ISO); e.g. the next day of logs.")
    ] = "2024-01-01",
) -> None:
    """Write synthetic interaction logs with oracle columns (see pipeline/datasets/synthetic.py)."""
    from pipeline.datasets.synthetic import generate_logs

    summary = generate_logs(
        out, rows, seed, days=days, users=users, items=items, start_day=start_day
    )
    typer.echo(summary.line())


def census(
    raw: Annotated[Path, typer.Option("--raw", help="Folder with census-income.{data,test}[.gz].")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for Parquet and config.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the validation/test halving.")] = 0,
) -> None:
    """Convert the UCI Census-Income (KDD) files to Parquet logs and a training config."""
    from pipeline.datasets.census import convert_census

    config = convert_census(raw, out, seed=seed)
    typer.echo(f"wrote Parquet logs and {config} (train with: adatt train --config {config})")
