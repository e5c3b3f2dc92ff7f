"""Benchmark: a 16-trial ASHA search over depth x experts per task x shared experts on
synthetic logs, against the default config (`configs/synthetic.yaml`'s model).

The default config runs as the search's first trial (`tune.include_default`), so both are
trained and measured the same way (same data, epochs and selection of the best epoch).

    python bench/tune_search.py                      # 200k rows, 16 trials, 3 epochs
    python bench/tune_search.py --rows 50000 --trials 8 --epochs 2   # a quick look

Prints the wall time, the trials ASHA stopped early, the best trial's validation mean AUC
against the default config's; the last line is `best_vs_default_mean_auc=<delta>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="synthetic rows")
    parser.add_argument("--trials", type=int, default=16, help="trials (the default included)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--searcher", choices=["random", "optuna"], default="optuna")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    args = parser.parse_args()

    from pipeline.tracking.runs import quiet_telemetry

    quiet_telemetry()
    import ray

    from pipeline.datasets.synthetic import generate_logs
    from tune.search import run_search
    from tune.space import parse_search_spec

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tune-bench-"))
    logs = workdir / "logs"
    if not any(logs.rglob("*.parquet")):
        generate_logs(logs, rows=args.rows, seed=0)
    raw = {
        "base": str(REPO_ROOT / "configs" / "synthetic.yaml"),
        "set": {
            "data.path": str(logs),
            "tracking.tracking_uri": f"sqlite:///{workdir}/mlflow.db",
            "train.storage_path": str(workdir / "runs"),
            "train.epochs": args.epochs,
            "train.num_workers": 1,
            "train.cpus_per_worker": 1.0,
        },
        "search": {
            "model.expert_dims": {"choice": [[64], [64, 32], [64, 32, 16]]},
            "model.experts_per_task": {"choice": [1, 2, 3]},
            "model.shared_experts": {"choice": [0, 1, 2]},
        },
        "tune": {
            "name": "bench",
            "searcher": args.searcher,
            "num_samples": args.trials,
            "include_default": True,
            "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        },
    }
    spec = parse_search_spec(raw, "bench spec", REPO_ROOT / "configs", "bench")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    start = time.perf_counter()
    try:
        outcome = run_search(spec)
    finally:
        seconds = time.perf_counter() - start
        ray.shutdown()

    default_values = spec.default_values()
    default = next(r for r in outcome.trials if r.values == default_values)
    for line in outcome.table:
        print(line)
    print(
        f"rows={args.rows} trials={len(outcome.trials)} epochs={args.epochs} cpus={os.cpu_count()}"
    )
    print(f"wall_time_s={seconds:.0f}")
    print(f"trials_stopped_early={outcome.stopped_early}")
    print(f"default_mean_auc={default.value:.4f} ({default.status}, {default.epochs} epochs)")
    print(f"best_mean_auc={outcome.best.value:.4f} {outcome.best.values}")
    print(f"best_vs_default_mean_auc={outcome.best.value - default.value:.4f}")


if __name__ == "__main__":
    main()
