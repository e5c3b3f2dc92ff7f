"""`adatt submit`, `adatt jobs` and `adatt stop`: Ray Jobs on a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        "-a",
        help="Ray job server, e.g. http://head:8265 (default: RAY_API_SERVER_ADDRESS, "
        "RAY_ADDRESS, then http://127.0.0.1:8265).",
    ),
]


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


def stop(
    job_id: Annotated[str, typer.Argument(help="The job's submission id.")],
    address: AddressOpt = None,
) -> None:
    """Stop a running Ray job."""
    from cluster.submit import stop_job

    stopped = stop_job(address, job_id)
    typer.echo(f"job {job_id}: {'stop requested' if stopped else 'already finished'}")
