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


def _print_outcome(outcome: Any, config: Any) -> None:
    from pipeline.report import summary_lines

    tasks = [t.name for t in config.data.tasks]
    for line in summary_lines(
        outcome.run_id, outcome.tracking_uri, outcome.metrics, outcome.oracle, tasks
    ):
        typer.echo(line)


@app.command()
@user_errors
def train(
    config: ConfigOpt,
    set_: SetOpt = None,
    resume: Annotated[
        str | None,
        typer.Option(help="Continue from a checkpoint folder or an MLflow run id."),
    ] = None,
) -> None:
    """Train a model: Parquet logs -> Ray Data -> Ray Train -> MLflow run."""
    from pipeline.config import load_config
    from pipeline.train import Terminated, run_training

    cfg = load_config(config, set_ or [])
    try:
        outcome = run_training(cfg, resume=resume)
    except KeyboardInterrupt as err:
        # 128 + the signal's number, as a shell reports a process a signal stopped.
        raise typer.Exit(code=143 if isinstance(err, Terminated) else 130) from None
    _print_outcome(outcome, cfg)


@app.command()
@user_errors
def demo(
    rows: Annotated[int, typer.Option(help="Synthetic rows to generate.")] = 1_000_000,
    out: Annotated[Path, typer.Option(help="Where the synthetic logs go.")] = Path("data/logs"),
    set_: SetOpt = None,
) -> None:
    """Generate synthetic logs (once) and train AdaTT on them with configs/synthetic.yaml."""
    import configs
    from pipeline.config import load_config
    from pipeline.synthetic import generate_logs
    from pipeline.train import run_training

    if not any(out.rglob("*.parquet")):
        typer.echo(f"generating {rows:,} synthetic rows into {out} ...")
        generate_logs(out, rows=rows, seed=0)
    cfg = load_config(configs.path("synthetic.yaml"), [f"data.path={out}", *(set_ or [])])
    outcome = run_training(cfg)
    _print_outcome(outcome, cfg)


@app.command()
@user_errors
def tune(
    config: ConfigOpt,
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the interrupted search of this spec.")
    ] = False,
    register_name: Annotated[
        str | None,
        typer.Option("--register", help="Register the best trial's model under this name."),
    ] = None,
) -> None:
    """Search the AdaTT design space with Ray Tune (see docs/tune.md); each trial is an MLflow
    child run of the search's run. --set tune.num_samples=8 changes the search, any other key
    (e.g. train.epochs=2) the base training config."""
    # Lazy import: `pipeline` must not depend on `tune` at import time.
    from tune.search import SearchInterrupted, run_search
    from tune.space import load_search_spec

    spec = load_search_spec(config, set_ or [])
    try:
        outcome = run_search(spec, resume=resume, register=register_name)
    except SearchInterrupted as stop:
        typer.echo(f"{stop}: adatt tune --config {config} --resume", err=True)
        raise typer.Exit(code=130) from None
    for line in outcome.table:
        typer.echo(line)
    typer.echo(
        f"best trial {outcome.best.trial_id}: {spec.settings.metric}={outcome.best.value:.4f} "
        f"(MLflow run {outcome.best.run_id}); {outcome.stopped_early} of {len(outcome.trials)} "
        f"trials stopped early; search run {outcome.parent_run_id}"
    )
    if outcome.registration:
        typer.echo(outcome.registration)
    else:
        typer.echo(f"register it with: adatt register --run {outcome.best.run_id}")


TrackingOpt = Annotated[
    str | None,
    typer.Option(
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."
    ),
]


def _tracking_for_registry(tracking_uri: str | None) -> str:
    """The tracking URI (checked reachable) for register/predict; quiet MLflow downloads."""
    from pipeline.config import TrackingConfig
    from pipeline.tracking import check_tracking_reachable, quiet_telemetry, resolve_tracking_uri

    quiet_telemetry()
    uri = resolve_tracking_uri(TrackingConfig(tracking_uri=tracking_uri))
    check_tracking_reachable(uri)
    return uri


@app.command()
@user_errors
def register(
    run: Annotated[
        str, typer.Option(help="MLflow run id: an `adatt train` run or a tune trial's run.")
    ],
    name: Annotated[str, typer.Option(help="Registered model name.")] = "adatt",
    alias: Annotated[str, typer.Option(help="Alias to move to the new version.")] = "champion",
    promote_if_better: Annotated[
        str | None,
        typer.Option(
            help="Move the alias only if the new version beats its holder on this validation "
            "metric, e.g. val/mean_auc (higher is better) or val/mean_ne (lower is better)."
        ),
    ] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Register a run's model in the MLflow registry and move an alias to it."""
    from pipeline.registry import register_run
    from pipeline.tracking import set_tracking

    uri = _tracking_for_registry(tracking_uri)
    outcome = register_run(set_tracking(uri), run, name, alias, promote_if_better)
    typer.echo(outcome.message)


@app.command()
@user_errors
def predict(
    model: Annotated[str, typer.Option(help="Model URI, e.g. models:/adatt@champion.")],
    input: Annotated[
        str, typer.Option("--input", help="Parquet logs to score (folder, glob, file or URI).")
    ],
    output: Annotated[
        str, typer.Option(help="New or empty folder (or URI) for the scored Parquet files.")
    ],
    passthrough: Annotated[
        list[str] | None,
        typer.Option(help="Input column copied to the output (e.g. an id); repeatable."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per scoring batch.")] = 4096,
    actors: Annotated[
        int, typer.Option(min=1, help="Scoring actors (each loads the model once).")
    ] = 1,
    gpu: Annotated[
        bool | None,
        typer.Option(
            "--gpu/--no-gpu", help="One GPU per actor (default: when the cluster has them)."
        ),
    ] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Score raw interaction logs with a registered model: one column per task."""
    from pipeline.predict import predict as run_predict

    uri = _tracking_for_registry(tracking_uri)
    rows = run_predict(model, input, output, uri, passthrough, batch_size, actors, gpu)
    typer.echo(f"scored {rows:,} rows into {output}")


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
