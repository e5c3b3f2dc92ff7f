"""The command-line options several commands share (Typer annotations): how a command
takes a config (a file and `--set` overrides) and a tracking server. The config layer
itself (`pipeline.config`) knows nothing of the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config field, e.g. --set train.epochs=5."),
]
TrackingOpt = Annotated[
    str | None,
    typer.Option(
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."
    ),
]
