"""`adatt tune`: the search's command."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.options import ConfigOpt, SetOpt


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
