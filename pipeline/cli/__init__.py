"""The `adatt` command line: the composition root of the project.

It is the one module that imports every package's commands (`pipeline.datasets.cli`,
`pipeline.training.cli`, `pipeline.serving.cli`, `tune.cli`, `cluster.cli`) and wires them
into one app; nothing imports it (import-linter's layers contract, pyproject.toml). Each
command's module imports its heavy dependencies (Ray, MLflow, torch) inside the command,
so `adatt --help` stays fast.

Bad input (`InputError`) is printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer

from cluster import cli as cluster_cli
from pipeline.datasets import cli as datasets_cli
from pipeline.errors import InputError
from pipeline.serving import cli as serving_cli
from pipeline.training import cli as training_cli
from tune import cli as tune_cli

app = typer.Typer(
    help="Train, search, register and serve AdaTT multi-task models on Ray + MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Convert public datasets to interaction logs.", no_args_is_help=True)
app.add_typer(data_app, name="data")


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


COMMANDS: list[tuple[typer.Typer, str, Callable[..., Any]]] = [
    (app, "generate", datasets_cli.generate),
    (data_app, "census", datasets_cli.census),
    (app, "train", training_cli.train),
    (app, "retrain", training_cli.retrain),
    (app, "demo", training_cli.demo),
    (app, "tune", tune_cli.tune),
    (app, "register", serving_cli.register),
    (app, "predict", serving_cli.predict),
    (app, "evaluate", serving_cli.evaluate),
    (app, "submit", cluster_cli.submit),
    (app, "jobs", cluster_cli.jobs),
    (app, "stop", cluster_cli.stop),
]
for group, name, command in COMMANDS:
    group.command(name)(user_errors(command))
