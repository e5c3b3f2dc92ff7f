"""`adatt predict`: batch scoring of raw logs with a logged model."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.options import TrackingOpt
from pipeline.tracking.security import redact


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
        int, typer.Option(min=1, help="Scoring actors (each builds the model once).")
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
    from pipeline.session import open_session

    session = open_session("predict", tracking_uri)
    rows = run_predict(session, model, input, output, passthrough, batch_size, actors, gpu)
    typer.echo(f"scored {rows:,} rows into {redact(output)}")
