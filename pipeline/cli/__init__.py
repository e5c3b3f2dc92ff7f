"""The `adatt` command line: the composition root of the project.

It is the one module that imports every package's commands (`pipeline.datasets.cli`,
`pipeline.training.cli`, `pipeline.serving.cli`, `pipeline.release.cli`, `tune.cli`,
`cluster.cli`) and wires them into one app; nothing imports it (import-linter's layers contract, pyproject.toml). Each
command's module imports its heavy dependencies (Ray, MLflow, torch) inside the command,
so `adatt --help` stays fast.

Bad input (`InputError`) is printed as one line on stderr with exit code 2; work that
stopped for a stated reason (`Stopped`: a non-finite loss, NaN scores) with exit code 1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer

from cluster import cli as cluster_cli
from pipeline.datasets import cli as datasets_cli
from pipeline.errors import InputError, Stopped
from pipeline.progress import flush_as_printed
from pipeline.release import cli as release_cli
from pipeline.serving import cli as serving_cli
from pipeline.tracking.security import redact_text
from pipeline.training import cli as training_cli
from tune import cli as tune_cli

app = typer.Typer(
    help="Train, search, register and serve AdaTT multi-task models on Ray + MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Convert public datasets to interaction logs.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@app.callback()
def _every_command() -> None:
    # Before any command: its lines, and those Ray forwards, reach a file or pipe as printed.
    flush_as_printed()


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn InputError (exit 2) and Stopped (exit 1) into a one-line message on stderr,
    credentials in URIs redacted."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (InputError, Stopped) as err:
            typer.echo(redact_text(f"error: {err}"), err=True)
            raise typer.Exit(code=2 if isinstance(err, InputError) else 1) from None

    return wrapper


# Each command is named after its function (Typer's default), `adatt data <name>` for the
# dataset converters.
for command in (
    datasets_cli.generate,
    training_cli.train,
    training_cli.demo,
    tune_cli.tune,
    release_cli.register,
    release_cli.evaluate,
    release_cli.retrain,
    serving_cli.predict,
    cluster_cli.submit,
    cluster_cli.jobs,
    cluster_cli.stop,
):
    app.command()(user_errors(command))
data_app.command()(user_errors(datasets_cli.census))
