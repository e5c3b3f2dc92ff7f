"""`adatt register`, `adatt evaluate` and `adatt retrain`: the registry, champion-vs-challenger
comparisons and the daily loop."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from pipeline.options import ConfigOpt, SetOpt, TrackingOpt
from pipeline.tracking.security import redact_text


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
    data: Annotated[
        str | None,
        typer.Option(
            help="Decide on this holdout instead of the runs' metrics: both models are "
            "scored on it (`adatt evaluate`) and the alias moves only on a significant gain."
        ),
    ] = None,
    min_gain: Annotated[
        float,
        typer.Option(help="With --data: the gain's 95 % interval must clear this margin."),
    ] = 0.0,
    group_column: Annotated[
        str | None, typer.Option(help="With --data: the users of GAUC and the bootstrap.")
    ] = None,
    bootstrap: Annotated[int, typer.Option(help="With --data: bootstrap replicates.")] = 200,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Register a run's model in the MLflow registry and move an alias to it."""
    from mlflow.exceptions import MlflowException

    from pipeline.errors import InputError
    from pipeline.release.registry import Evidence, register_run
    from pipeline.session import open_session

    if data is None and (min_gain or group_column):
        raise InputError("--min-gain/--group-column: they apply to a comparison on --data")
    evidence = Evidence(data, min_gain, group_column, bootstrap) if data else None
    session = open_session("register", tracking_uri)
    try:
        outcome = register_run(session.client, run, name, alias, promote_if_better, evidence)
    except MlflowException as err:  # the server failed or refused: no evidence, no move
        first = str(err).strip().splitlines()[0]
        message = f"error: the registry answered {first}; the alias was not moved"
        typer.echo(redact_text(message), err=True)
        raise typer.Exit(code=1) from None
    typer.echo(outcome.message)


def evaluate(
    model: Annotated[
        list[str],
        typer.Option(
            help="Model URI; repeat it. The first (e.g. models:/adatt@champion) is the "
            "reference the others are compared with."
        ),
    ],
    data: Annotated[str, typer.Option(help="Holdout Parquet logs with labels.")],
    group_column: Annotated[
        str | None,
        typer.Option(help="Users for GAUC and the bootstrap (default: data.group_column)."),
    ] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap replicates.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per scoring batch.")] = 4096,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Score models on the same rows; AUC, GAUC, NE and the gains, with intervals."""
    from pipeline.release.evaluate import evaluate as run_evaluate
    from pipeline.release.evaluate import report_lines
    from pipeline.session import open_session

    session = open_session("evaluate", tracking_uri)
    result = run_evaluate(session.client, model, data, group_column, bootstrap, seed, batch_size)
    for line in report_lines(result):
        typer.echo(line)
    typer.echo(f"logged to MLflow run {result.run_id}")


def retrain(
    config: ConfigOpt,
    model: Annotated[
        str,
        typer.Option(help="The champion to start from and the alias to move: models:/NAME@ALIAS."),
    ],
    day: Annotated[str, typer.Option(help="The day of logs to train on, YYYY-MM-DD.")],
    since: Annotated[
        str | None,
        typer.Option(
            help="Backfill: every day from this one to --day, in order; a day already "
            "registered is skipped."
        ),
    ] = None,
    set_: SetOpt = None,
    metric: Annotated[
        str, typer.Option(help="Promotion metric on the day's holdout (adatt evaluate's keys).")
    ] = "mean_gauc",
    min_gain: Annotated[
        float, typer.Option(help="Margin the gain's 95 % interval must clear to promote.")
    ] = 0.0,
    holdout: Annotated[
        float, typer.Option(min=0.01, max=0.5, help="Fraction of the day's users held out.")
    ] = 0.2,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap replicates.")] = 200,
    refit_stats: Annotated[
        bool, typer.Option(help="Refit the dense statistics on the day (default: keep).")
    ] = False,
) -> None:
    """One day of the loop (or every day since --since): warm start from the champion,
    evaluate on the day's holdout, register, promote on a significant gain. Exit 0 done, 2
    bad input (nothing written), 1 a failure (docs/registry.md). A backfill goes on past a
    day that fails, and exits with the first failed day's code."""
    from pipeline.config import load_config
    from pipeline.release.retrain import days_between
    from pipeline.session import open_session

    cfg = load_config(config, set_ or [])
    session = open_session("retrain", cfg.tracking)
    days = days_between(since, day) if since else [day]
    options = {"holdout": holdout, "bootstrap": bootstrap, "refit_stats": refit_stats}
    codes = [
        _retrain_day(session, cfg, model, each, (metric, min_gain), options, since, len(days))
        for each in days
    ]
    if failed := next((code for code in codes if code), 0):
        raise typer.Exit(code=failed)


def _retrain_day(
    session: Any, cfg: Any, model: str, day: str, rule: tuple[str, float], options: dict,
    since: str | None, days: int,
) -> int:  # fmt: skip
    """One day of `adatt retrain`: 0 when done (or, in a backfill, done already), else its
    exit code after one `error:` line; a lone day's error is raised as it is. A server error
    (`MlflowException`: planning the day, resolving the champion) fails that day only."""
    from mlflow.exceptions import MlflowException

    from pipeline.errors import InputError, Stopped
    from pipeline.release.retrain import done_version
    from pipeline.release.retrain import retrain as run_retrain
    from pipeline.session import Terminated

    try:
        try:
            if since and (version := done_version(session, cfg, day)):
                typer.echo(f"retrain {day}: done already (version {version}); skipped")
                return 0
            outcome = run_retrain(cfg, model, day, *rule, session=session, **options)
        except MlflowException as err:
            first = str(err).strip().splitlines()[0]
            raise Stopped(f"the MLflow server answered {first}") from None
    except KeyboardInterrupt as err:
        raise typer.Exit(code=143 if isinstance(err, Terminated) else 130) from None
    except (InputError, Stopped) as err:
        if days == 1:
            raise
        typer.echo(redact_text(f"error: retrain {day}: {err}"), err=True)
        return 2 if isinstance(err, InputError) else 1
    typer.echo(outcome.registration.message)
    typer.echo(outcome.line())
    return 0
