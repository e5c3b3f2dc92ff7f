"""The `adatt` command line. Each command is a thin wrapper: the work lives in its module.

Bad input (`InputError`) is printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.errors import InputError

app = typer.Typer(
    help="Train, search, register and serve AdaTT multi-task models on Ray + MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Convert public datasets to interaction logs.", no_args_is_help=True)
app.add_typer(data_app, name="data")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config field, e.g. --set train.epochs=5."),
]


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn InputError into a one-line message and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except InputError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


@app.command()
@user_errors
def generate(
    out: Annotated[Path, typer.Option("--out", help="Output folder for the Parquet logs.")],
    rows: Annotated[int, typer.Option("--rows", min=1, help="Number of rows.")] = 1_000_000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    days: Annotated[int, typer.Option("--days", min=1, help="Days (one file each).")] = 14,
    users: Annotated[int, typer.Option("--users", min=1)] = 2_000,
    items: Annotated[int, typer.Option("--items", min=1)] = 1_000,
) -> None:
    """Write synthetic interaction logs with oracle columns (see pipeline/synthetic.py)."""
    from pipeline.synthetic import generate_logs

    summary = generate_logs(out, rows, seed, days=days, users=users, items=items)
    typer.echo(summary.line())


@data_app.command("census")
@user_errors
def census(
    raw: Annotated[Path, typer.Option("--raw", help="Folder with census-income.{data,test}[.gz].")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for Parquet and config.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the validation/test halving.")] = 0,
) -> None:
    """Convert the UCI Census-Income (KDD) files to Parquet logs and a training config."""
    from pipeline.census import convert_census

    config = convert_census(raw, out, seed=seed)
    typer.echo(f"wrote Parquet logs and {config} (train with: adatt train --config {config})")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
