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


AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        "-a",
        help="Ray job server, e.g. http://head:8265 (default: RAY_API_SERVER_ADDRESS, "
        "RAY_ADDRESS, then http://127.0.0.1:8265).",
    ),
]


@app.command()
@user_errors
def submit(
    entrypoint: Annotated[
        list[str], typer.Argument(help="The command after `--`, e.g. -- adatt train -c x.yaml")
    ],
    address: AddressOpt = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Stream logs; exit 0 only on success.")
    ] = False,
    pip: Annotated[
        bool, typer.Option("--pip", help="Install pyproject dependencies in the job.")
    ] = False,
    working_dir: Annotated[
        Path, typer.Option("--working-dir", help="Directory shipped to the cluster.")
    ] = Path("."),
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="Job env var, KEY=VALUE or KEY.")
    ] = None,
    no_check: Annotated[
        bool, typer.Option("--no-check", help="Skip the config and cluster-rule checks.")
    ] = False,
) -> None:
    """Run a command (usually `adatt train`) as a Ray job: adatt submit --wait -- adatt train -c x.yaml"""
    # Lazy import: `pipeline` must not depend on `cluster` at import time.
    from cluster.submit import exit_code, failure_report, submit_job

    job_id, status = submit_job(
        address, entrypoint, working_dir, wait, pip=pip, extra_env=env, check=not no_check
    )
    typer.echo(f"job {job_id}: {status.value}", err=True)
    if not wait:
        typer.echo(
            f"follow it with: ray job logs --follow {job_id}  (stop: adatt stop {job_id})", err=True
        )
        return
    if exit_code(status) != 0:
        typer.echo(failure_report(address, job_id), err=True)
    raise typer.Exit(code=exit_code(status))


@app.command()
@user_errors
def jobs(address: AddressOpt = None) -> None:
    """List the jobs submitted to a Ray cluster."""
    import datetime

    from cluster.submit import list_jobs

    for job in list_jobs(address):
        started = (
            datetime.datetime.fromtimestamp(job.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")
            if job.start_time
            else "-"
        )
        typer.echo(f"{job.submission_id}  {job.status.value:<9}  {started}  {job.entrypoint}")


@app.command()
@user_errors
def stop(
    job_id: Annotated[str, typer.Argument(help="The job's submission id.")],
    address: AddressOpt = None,
) -> None:
    """Stop a running Ray job."""
    from cluster.submit import stop_job

    stopped = stop_job(address, job_id)
    typer.echo(f"job {job_id}: {'stop requested' if stopped else 'already finished'}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
