"""The GPU check as one prepared command: the train step alone, then `adatt train` itself,
through Ray and MLflow on SQLite, on the census config and on the wide schema; writes
`docs/results/gpu.md`. About 4 minutes on an H200.

On the lent GPU machine (the device tool), with the wheels of `../shared/tools/device_wheels.py`
in `.whl/` and the census Parquet in `data/census/` (`adatt data census --raw
../shared/data/census-income --out data/census`; both carried, both git-ignored):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && \
      python3 bench/gpu_job.py --markdown docs/results/gpu.md

Steps:
1. `bench/gpu_step.py` (eager and one CUDA graph, no compile): the census model's graph step
   at batch 4096, in samples/s.
2. `adatt train -c configs/census.yaml` at batch 4096 on one GPU worker (`train.num_workers:
   auto`), 3 epochs: the last epoch's `train/samples_per_s` from MLflow; `train_vs_step=` is
   it over step 1's figure (the feed, the epoch cache and the loop's events included).
3. the same on the wide schema of `bench/feed.py` (200 dense, 30 categorical of 1e6-1e7 ids,
   2 multi-hot, 6 tasks).

On a machine without a GPU it still runs steps 2 and 3 on CPUs (a dry run of the job).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step_figure() -> tuple[float | None, str]:
    """The census graph step's samples/s at batch 4096, and gpu_step's table."""
    import torch

    if not torch.cuda.is_available():
        return None, "(no GPU: the step was not measured)"
    command = [sys.executable, "bench/gpu_step.py", "--skip-compile", "--repeats", "3"]
    command += ["--markdown", "/tmp/gpu_step.md"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    found = re.search(r"graph_step_samples_per_s_4096=([\d,]+)", done.stdout)
    table = Path("/tmp/gpu_step.md").read_text() if found else done.stderr[-2000:]
    return (float(found.group(1).replace(",", "")) if found else None), table


def train(name: str, config: Path, overrides: list[str], work: Path) -> dict:
    """`adatt train` as a user runs it; the last epoch's figures from MLflow."""
    from bench.harness import by_epoch
    from pipeline.tracking.runs import client_for

    uri = f"sqlite:///{work}/{name}.db"
    sets = [
        f"tracking.tracking_uri={uri}",
        f"train.storage_path={work}/{name}-runs",
        "data.batch_size=4096",
        "train.epochs=3",
        "train.num_workers=auto",
        *overrides,
    ]
    command = [sys.executable, "-m", "pipeline.cli", "train", "-c", str(config)]
    command += [arg for item in sets for arg in ("--set", item)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"adatt train ({name}) failed:\n{done.stderr[-4000:]}")
    run_id = re.search(r"MLflow run: (\w+)", done.stdout).group(1)
    client = client_for(uri)
    rates = by_epoch(client, run_id, "train/samples_per_s")
    params = client.get_run(run_id).data.params
    hit = by_epoch(client, run_id, "data/cache_hit")
    return {
        "name": name,
        "rates": rates,
        "seconds": seconds,
        "workers": params.get("train.num_workers"),
        "cache": hit,
        "console": [line for line in done.stdout.splitlines() if line.startswith("  ")],
    }


def markdown(step: float | None, table: str, runs: list[dict], device: str) -> str:
    lines = [table.rstrip(), "", "## `adatt train` on the same machine", ""]
    lines.append(
        f"`python bench/gpu_job.py` on {device}, {time.strftime('%Y-%m-%d')}: each run a "
        "fresh `adatt train` (local Ray, MLflow on SQLite), batch 4096, 3 epochs, one GPU "
        "worker; samples/s of each epoch from MLflow (`train/samples_per_s`)."
    )
    lines += ["", "| schema | epoch 1 | epoch 2 | epoch 3 | cache hit (epochs 2, 3) | run (s) |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for run in runs:
        r = run["rates"]
        lines.append(
            f"| {run['name']} | {r.get(1, 0):,.0f} | {r.get(2, 0):,.0f} | {r.get(3, 0):,.0f} | "
            f"{run['cache'].get(2)}, {run['cache'].get(3)} | {run['seconds']:.0f} |"
        )
    census = next((r["rates"].get(3) for r in runs if r["name"] == "census"), None)
    if step and census:
        lines += [
            "",
            f"`train_vs_step={census / step:.3f}` (census, last epoch over the graph step).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--census", type=Path, default=ROOT / "data" / "census")
    parser.add_argument("--wide-rows", type=int, default=500_000)
    parser.add_argument("--wide-buckets", type=int, default=2_000_000, help="rows per id table")
    parser.add_argument("--markdown", type=Path, help="write the results here")
    parser.add_argument("--work", type=Path, default=Path("/tmp/adatt-gpu-job"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    import torch

    from bench.feed import wide_config, write_wide_logs

    args.work.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    step, table = step_figure()
    runs = []
    if any(args.census.rglob("*.parquet")):
        census = ROOT / "configs" / "census.yaml"
        runs.append(train("census", census, [f"data.path={args.census}"], args.work))
    wide = args.work / "wide"
    if not any(wide.glob("*.parquet")):
        write_wide_logs(wide, args.wide_rows)
    runs.append(train("wide", wide_config(args.work, wide, args.wide_buckets), [], args.work))
    for run in runs:
        print(f"{run['name']}: samples/s by epoch {run['rates']} cache hit {run['cache']}")
    if step and runs[0]["name"] == "census":
        print(f"graph_step_samples_per_s_4096={step:,.0f}")
        print(f"train_vs_step={runs[0]['rates'][3] / step:.3f}")
    if args.markdown:
        args.markdown.write_text(markdown(step, table, runs, device))


if __name__ == "__main__":
    main()
