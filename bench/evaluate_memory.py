"""Evaluate benchmark: the driver's memory of `adatt evaluate` at 1M and 10M holdout rows.

`adatt evaluate` reduces every metric (AUC, GAUC, NE and their by-user bootstrap) on the Ray
workers; the driver gathers only fixed-size partial sums and one AUC part per 32k rows. This
bench shows it: two models (untrained tiny networks, seeds 0 and 1, logged to a local MLflow
store) are compared on synthetic holdouts of each size, each evaluation in a fresh driver
process on a fresh local Ray, as the product runs it (the reduction chosen by its memory
budget). The driver's growth is measured above its resident memory right after the imports
(Ray, MLflow, torch: several hundred MiB that no holdout changes): its peak (`ru_maxrss`)
minus that baseline. Ray's workers and object store are other processes. Last line:
`evaluate_driver_rss_10m_vs_1m=<ratio>` of the two growths (goal: <= 1.2).

    python bench/evaluate_memory.py [--rows 1000000 10000000] [--bootstrap 200] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mib() -> float:
    """This process's resident memory now (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def driver(tracking_uri: str, models: list[str], data: str, bootstrap: int) -> None:
    """One evaluation in this process; prints its figures as one JSON line."""
    from pipeline.release import evaluate as module
    from pipeline.tracking.runs import client_for

    baseline = _rss_mib()  # after the imports: what any command of the product holds
    reductions = []
    fits = module.one_task_fits
    module.one_task_fits = lambda *args: reductions.append(fits(*args)) or reductions[-1]
    started = time.perf_counter()
    result = module.evaluate(client_for(tracking_uri), models, data, bootstrap=bootstrap)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    gain = result.gains[1]["mean_gauc"]
    figures = {"rows": result.rows, "seconds": seconds, "baseline_mib": baseline}
    figures.update(peak_rss_mib=peak, growth_mib=peak - baseline)
    figures["reduction"] = "one task" if reductions and reductions[0] else "distributed"
    figures["gain_mean_gauc"] = [gain.value, gain.low, gain.high]
    print("RESULT " + json.dumps(figures), flush=True)


def log_models(tracking_uri: str, logs: Path, workdir: Path) -> list[str]:
    """Two untrained tiny networks (seeds 0 and 1) with preprocessing fitted on `logs`."""
    import torch

    from bench.harness import log_untrained_run, tiny_config
    from models import build_model

    config = tiny_config(logs, workdir)
    uris = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        weights = build_model(config.model, config.data.feature_schema()).state_dict()
        run = log_untrained_run(tracking_uri, logs, workdir / f"model-{seed}", weights)
        uris.append(run.model_uri)
    return uris


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--keep", type=Path, help="write the logs here instead of a temp dir")
    parser.add_argument("--driver", nargs=3, metavar=("TRACKING_URI", "MODELS", "DATA"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    if args.driver:
        tracking_uri, models, data = args.driver
        driver(tracking_uri, models.split(","), data, args.bootstrap)
        return
    from pipeline.datasets.synthetic import generate_logs

    results = []
    with tempfile.TemporaryDirectory(prefix="adatt-bench-") as tmp:
        base = args.keep or Path(tmp)
        tracking_uri = f"sqlite:///{base / 'mlflow.db'}"
        for rows in args.rows:
            if not any((base / f"logs-{rows}").glob("*.parquet")):  # --keep reuses them
                generate_logs(base / f"logs-{rows}", rows=rows, seed=1)
        models = log_models(tracking_uri, base / f"logs-{min(args.rows)}", base / "models")
        for rows in args.rows:
            command = [sys.executable, __file__, "--bootstrap", str(args.bootstrap), "--driver"]
            command += [tracking_uri, ",".join(models), str(base / f"logs-{rows}")]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            found = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not found:
                sys.exit(f"evaluate on {rows:,} rows failed:\n{done.stderr[-3000:]}")
            figures = json.loads(found[-1].removeprefix("RESULT "))
            low, high = figures["gain_mean_gauc"][1:]
            print(
                f"rows={figures['rows']:,} evaluate_s={figures['seconds']:.1f} "
                f"reduction={figures['reduction'].replace(' ', '_')} "
                f"driver_rss_after_imports_mib={figures['baseline_mib']:,.0f} "
                f"driver_peak_rss_mib={figures['peak_rss_mib']:,.0f} "
                f"driver_growth_mib={figures['growth_mib']:,.1f} "
                f"gain_mean_gauc_interval=[{low:+.4f}, {high:+.4f}]",
                flush=True,
            )
            results.append(figures["growth_mib"])
    name = f"evaluate_driver_rss_{_short(args.rows[-1])}_vs_{_short(args.rows[0])}"
    print(f"{name}={results[-1] / results[0]:.3f} (growth above the driver's RSS after imports)")


def _short(rows: int) -> str:
    """10000000 -> 10m, 200000 -> 200k."""
    for size, suffix in ((1_000_000, "m"), (1_000, "k")):
        if rows >= size and rows % size == 0:
            return f"{rows // size}{suffix}"
    return str(rows)


if __name__ == "__main__":
    main()
