"""`adatt register`, `adatt predict` and `adatt evaluate`: the registry, batch scoring and
champion-vs-challenger comparisons."""

from __future__ import annotations

from typing import Annotated

import typer

TrackingOpt = Annotated[
    str | None,
    typer.Option(
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."
    ),
]


def _tracking_for_registry(tracking_uri: str | None) -> str:
    """The tracking URI (checked reachable) for register/predict; quiet MLflow downloads."""
    from pipeline.config import TrackingConfig
    from pipeline.tracking.runs import (
        check_tracking_reachable,
        quiet_telemetry,
        resolve_tracking_uri,
    )

    quiet_telemetry()
    uri = resolve_tracking_uri(TrackingConfig(tracking_uri=tracking_uri))
    check_tracking_reachable(uri)
    return uri


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
            help="Decide on this holdout instead of the runs' metrics: both versions are "
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
    from pipeline.errors import InputError
    from pipeline.serving.registry import Evidence, register_run
    from pipeline.tracking.runs import set_tracking

    if data is None and (min_gain or group_column):
        raise InputError("--min-gain/--group-column: they apply to a comparison on --data")
    evidence = Evidence(data, min_gain, group_column, bootstrap) if data else None
    uri = _tracking_for_registry(tracking_uri)
    outcome = register_run(set_tracking(uri), run, name, alias, promote_if_better, evidence)
    typer.echo(outcome.message)


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
    from pipeline.serving.predict import predict as run_predict

    uri = _tracking_for_registry(tracking_uri)
    rows = run_predict(model, input, output, uri, passthrough, batch_size, actors, gpu)
    typer.echo(f"scored {rows:,} rows into {output}")


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
    from pipeline.serving.evaluate import evaluate as run_evaluate
    from pipeline.serving.evaluate import report_lines

    uri = _tracking_for_registry(tracking_uri)
    result = run_evaluate(model, data, uri, group_column, bootstrap, seed, batch_size)
    for line in report_lines(result):
        typer.echo(line)
    typer.echo(f"logged to MLflow run {result.run_id}")
