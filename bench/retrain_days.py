"""The daily retraining loop over consecutive days of synthetic logs (`adatt retrain`).

A first model is trained cold on `--history-days` days and registered as `@champion`; then
each of `--days` new days runs one retrain: warm start from the champion, one epoch on the
day, champion and challenger scored on the day's holdout users, promotion when the lower end
of the challenger's GAUC gain interval is above `--min-gain`. Tracking is a local SQLite
store in a temporary folder (the tests run the same loop against `mlflow server`).

Prints one line per day: the champion's and the challenger's mean GAUC on the holdout with
their 95 % intervals, the gain's interval, and whether the alias moved; then
`promotions=<n>/<days>`.

    python bench/retrain_days.py [--history-rows 300000] [--day-rows 40000] [--days 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")

from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.datasets.synthetic import generate_logs  # noqa: E402
from pipeline.release.registry import register_run  # noqa: E402
from pipeline.release.retrain import retrain  # noqa: E402
from pipeline.tracking import tags  # noqa: E402
from pipeline.training.driver import run_training  # noqa: E402

NAME = "bench-daily"
FIRST_DAY = dt.date(2024, 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--history-rows", type=int, default=300_000)
    parser.add_argument("--history-days", type=int, default=14)
    parser.add_argument("--history-epochs", type=int, default=2)
    parser.add_argument("--day-rows", type=int, default=40_000)
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--min-gain", type=float, default=0.0)
    parser.add_argument("--bootstrap", type=int, default=200)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="retrain-days-"))
    logs = work / "logs"
    generate_logs(logs, args.history_rows, seed=0, days=args.history_days)
    new_days = [
        (FIRST_DAY + dt.timedelta(days=args.history_days + i)).isoformat() for i in range(args.days)
    ]
    for day in new_days:
        generate_logs(logs, args.day_rows, seed=0, days=1, start_day=day)
    tracking = f"sqlite:///{work}/mlflow.db"
    base = [
        f"tracking.tracking_uri={tracking}",
        f"train.storage_path={work}/runs",
        "tracking.experiment=retrain-days",
    ]
    history = [str(p) for p in sorted(logs.glob("*.parquet")) if p.stem[4:] not in new_days]
    cold = load_config(
        REPO / "configs" / "synthetic.yaml",
        [*base, f"data.path={history}", f"train.epochs={args.history_epochs}"],
    )
    first = run_training(cold)
    client = MlflowClient(tracking, registry_uri=tracking)
    register_run(client, first.run_id, NAME, "champion")
    print(f"day 0 ({args.history_days} days, {args.history_rows:,} rows): version 1 @champion")

    daily = load_config(
        REPO / "configs" / "synthetic.yaml", [*base, f"data.path={logs}", "train.epochs=1"]
    )
    promotions = 0
    for day in new_days:
        outcome = retrain(
            daily,
            f"models:/{NAME}@champion",
            day,
            min_gain=args.min_gain,
            bootstrap=args.bootstrap,
        )
        version = client.get_model_version(NAME, outcome.registration.version)
        evaluation = client.get_run(version.tags[tags.PROMOTION_EVALUATION]).data.metrics

        def shown(prefix: str, m: dict = evaluation) -> str:
            key = f"{prefix}/mean_gauc"
            return f"{m[key]:.4f} [{m[key + '/low']:.4f}, {m[key + '/high']:.4f}]"

        promotions += outcome.registration.promoted
        print(
            f"{day}: champion v{version.tags[tags.PROMOTION_COMPARED_WITH]} gauc {shown('0')}  "
            f"challenger v{version.version} gauc {shown('1')}  gain {shown('gain.1')}  "
            f"{'promoted' if outcome.registration.promoted else 'kept'}",
            flush=True,
        )
    print(f"promotions={promotions}/{len(new_days)}")


if __name__ == "__main__":
    main()
