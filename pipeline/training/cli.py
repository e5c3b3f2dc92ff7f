"""`adatt train` and `adatt demo`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.options import ConfigOpt, SetOpt
from pipeline.tracking.security import redact


def summary_lines(
    run_id: str,
    tracking_uri: str,
    metrics: Mapping[str, float],
    oracle: Mapping[str, float],
    tasks: list[str],
) -> list[str]:
    """The lines `adatt train` prints when it finishes."""
    split = "test" if any(k.startswith("test/") for k in metrics) else "best/val"
    lines = [f"MLflow run: {run_id}"]
    for task in tasks:
        auc = metrics.get(f"{split}/{task}/auc")
        if auc is None:
            mse = metrics.get(f"{split}/{task}/mse")
            lines.append(f"  {task:<14} {split} mse={mse:.4f}" if mse is not None else f"  {task}")
            continue
        oracle_auc = next((v for k, v in oracle.items() if k.endswith(f"/{task}/auc")), None)
        ne = metrics.get(f"{split}/{task}/ne", float("nan"))
        line = f"  {task:<14} {split} auc={auc:.4f} ne={ne:.4f}"
        if oracle_auc is not None:
            line += f"  oracle auc={oracle_auc:.4f} (gap {oracle_auc - auc:+.4f})"
        lines.append(line)
    if tracking_uri.startswith("sqlite:///"):
        lines.append(f"Open the UI: mlflow ui --backend-store-uri {tracking_uri}")
    else:
        lines.append(f"Open the UI: {redact(tracking_uri)}/#/experiments (run {run_id})")
    return lines


def _print_outcome(outcome: Any, config: Any) -> None:
    tasks = [t.name for t in config.data.tasks]
    for line in summary_lines(
        outcome.run_id, outcome.tracking_uri, outcome.metrics, outcome.oracle, tasks
    ):
        typer.echo(line)


def train(
    config: ConfigOpt,
    set_: SetOpt = None,
    resume: Annotated[
        str | None,
        typer.Option(help="Continue from a checkpoint folder or an MLflow run id."),
    ] = None,
    warm_start: Annotated[
        str | None,
        typer.Option(
            help="Start a new run from a model's weights and preprocessing: "
            "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a run id."
        ),
    ] = None,
    refit_stats: Annotated[
        bool,
        typer.Option(help="With --warm-start, refit the dense statistics on this data."),
    ] = False,
) -> None:
    """Train a model: Parquet logs -> Ray Data -> Ray Train -> MLflow run."""
    from pipeline.config import load_config
    from pipeline.session import Terminated
    from pipeline.training.driver import run_training

    cfg = load_config(config, set_ or [])
    try:
        outcome = run_training(cfg, resume=resume, warm_start=warm_start, refit_stats=refit_stats)
    except KeyboardInterrupt as err:
        # 128 + the signal's number, as a shell reports a process a signal stopped.
        raise typer.Exit(code=143 if isinstance(err, Terminated) else 130) from None
    _print_outcome(outcome, cfg)


def demo(
    rows: Annotated[int, typer.Option(help="Synthetic rows to generate.")] = 1_000_000,
    out: Annotated[Path, typer.Option(help="Where the synthetic logs go.")] = Path("data/logs"),
    set_: SetOpt = None,
) -> None:
    """Generate synthetic logs (once) and train AdaTT on them with configs/synthetic.yaml."""
    import configs
    from pipeline.config import load_config
    from pipeline.datasets.synthetic import generate_logs
    from pipeline.training.driver import run_training

    if not any(out.rglob("*.parquet")):
        typer.echo(f"generating {rows:,} synthetic rows into {out} ...")
        generate_logs(out, rows=rows, seed=0)
    cfg = load_config(configs.path("synthetic.yaml"), [f"data.path={out}", *(set_ or [])])
    outcome = run_training(cfg)
    _print_outcome(outcome, cfg)
