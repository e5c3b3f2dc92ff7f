"""Cost of a training step against the size of the id tables: dense vs TorchRec tables.

`user_id` and `item_id` get 10^5, 10^6 and 10^7 hash buckets each; everything else is the
synthetic config. Each setting is one `adatt train` over the same synthetic logs with
2 workers, and the figures are its steady epochs' (epoch 1 is warm-up):
  - samples/s;
  - peak resident memory of a worker (the largest of the workers');
  - table memory of a worker: the tables' weights and optimizer state it holds (dense:
    every table whole, with Adam's two moments; torchrec: its shards, with row-wise
    Adagrad's one value per row).
`model.embeddings: torchrec` runs with `train.sharding: row_wise`, so each worker holds half
of every table. Prints a table, then last:
  - `torchrec_1e7_vs_1e5=<ratio>`: torchrec samples/s at 10^7 buckets over 10^5 (target >= 0.8);
  - `rowwise_mem_per_worker_ratio=<ratio>`: torchrec row-wise table memory per worker over the
    dense replicated one, at the largest bucket count both ran (target <= 0.6).

    python bench/id_scale.py [--rows 400000] [--epochs 5] [--dense-buckets 1e5,1e6]

Dense tables at 10^7 buckets are left out by default: they all-reduce 2 x 10^7 x 16 floats
at every step (issue 21: no epoch in 17 minutes, then the run died); `--dense-buckets
1e5,1e6,1e7` runs them anyway.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")

from pipeline.config import load_config  # noqa: E402
from pipeline.datasets.synthetic import generate_logs  # noqa: E402
from pipeline.training.checkpoint import load_checkpoint  # noqa: E402
from pipeline.training.driver import run_training  # noqa: E402

ID_COLUMNS = ("user_id", "item_id")


def _buckets(text: str) -> list[int]:
    return [int(float(b)) for b in text.split(",") if b]


def run(logs: Path, work: Path, embeddings: str, buckets: int, args: argparse.Namespace) -> dict:
    """One training; the steady epochs' median samples/s and the largest memory figures."""
    raw = load_config(REPO / "configs" / "synthetic.yaml").model_dump(mode="json")
    categorical = [
        {**f, "buckets": buckets} if f["column"] in ID_COLUMNS else f
        for f in raw["data"]["categorical"]
    ]
    name = f"{embeddings}-{buckets:.0e}"
    config = load_config(
        REPO / "configs" / "synthetic.yaml",
        [
            f"data.path={logs}",
            f"data.categorical={categorical}",
            f"model.embeddings={embeddings}",
            "train.sharding=row_wise",
            f"train.epochs={args.epochs}",
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",
            "train.threads_per_worker=1",
            f"train.storage_path={work}/{name}/runs",
            f"tracking.tracking_uri=sqlite:///{work}/{name}.db",
            "tracking.log_model=false",
            *args.set,
        ],
    )
    started = time.perf_counter()
    outcome = run_training(config)
    history = load_checkpoint(outcome.checkpoint_path).history
    steady = history[1:] or history
    return {
        "embeddings": embeddings,
        "buckets": buckets,
        "samples_per_s": float(np.median([h["train/samples_per_s"] for h in steady])),
        "epochs": [round(h["train/samples_per_s"]) for h in history],
        "peak_mb": max(h["train/peak_memory_mb_per_worker"] for h in history),
        "table_mb": max(h["train/table_mb_per_worker"] for h in history),
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--torchrec-buckets", default="1e5,1e6,1e7")
    parser.add_argument("--dense-buckets", default="1e5,1e6")
    parser.add_argument("--set", action="append", default=[], help="config override")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp) / "logs"
        generate_logs(logs, rows=args.rows, seed=0, users=args.users, items=args.items)
        for embeddings, buckets in [
            *(("dense", b) for b in _buckets(args.dense_buckets)),
            *(("torchrec", b) for b in _buckets(args.torchrec_buckets)),
        ]:
            results.append(run(logs, Path(tmp), embeddings, buckets, args))
            r = results[-1]
            print(f"done {embeddings} {buckets:.0e}: samples/s by epoch {r['epochs']}", flush=True)

    print(
        f"{args.rows:,} rows ({args.users:,} users, {args.items:,} items), {args.epochs} epochs, "
        f"2 workers x 0.5 CPU, {os.cpu_count()} CPUs; buckets of user_id and item_id each"
    )
    header = ("embeddings", "buckets", "samples/s", "peak MB/worker", "table MB/worker", "wall s")
    print("".join(f"{h:>{w}}" for h, w in zip(header, (10, 9, 11, 16, 17, 8), strict=True)))
    for r in results:
        print(
            f"{r['embeddings']:<10}{r['buckets']:>9.0e}{r['samples_per_s']:>11,.0f}"
            f"{r['peak_mb']:>16,.0f}{r['table_mb']:>17,.1f}{r['wall_s']:>8.0f}"
        )
    by = {(r["embeddings"], r["buckets"]): r for r in results}
    if ("torchrec", 10**5) in by and ("torchrec", 10**7) in by:
        ratio = by[("torchrec", 10**7)]["samples_per_s"] / by[("torchrec", 10**5)]["samples_per_s"]
        print(f"torchrec_1e7_vs_1e5={ratio:.3f}")
    both = sorted(b for e, b in by if e == "dense" and ("torchrec", b) in by)
    if both:
        b = both[-1]
        ratio = by[("torchrec", b)]["table_mb"] / by[("dense", b)]["table_mb"]
        print(f"rowwise_mem_per_worker_ratio={ratio:.3f}  (at {b:.0e} buckets)")


if __name__ == "__main__":
    main()
