"""Feed memory benchmark: the input pipeline's memory against the data's size.

Generates 1M and then 10M rows (`--rows` to change) and runs the product's feed on each
(`bench/feed.py`'s product path: 2 train workers, or `--workers`, streaming every split
of three epochs through their own Ray Data streams) with an epoch cache budget far below
the data, so every epoch streams (`data.cache_budget_gb: 0.001`), on a fresh local Ray,
sampling the memory of the whole process tree (this process, Ray's raylet/GCS and all
workers; proportional set size, so shared object-store pages count once). Last line:
`ingest_rows_per_s=<x> mem_growth_10x=<ratio>` (rows/s of the largest run's first epoch;
peak memory of the largest run over the smallest). Memory must stay flat in the data's
size.

    python bench/ingest.py [--rows 1000000 10000000] [--batch-size 4096] [--workers 2]
                           [--keep DIR]

One worker on the 2-CPU machine holds 1.5 CPUs and runs three read tasks at once, so it
reads a pass as several tasks sharing the row groups (`Budget.tasks_for`); two workers
read a pass as one task each.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class PeakMemory:
    """Samples the memory of this process and all its descendants in a thread."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _usage(proc: psutil.Process) -> int:
        try:
            info = proc.memory_full_info()
            return getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return 0

    def sample(self) -> int:
        me = psutil.Process()
        total = self._usage(me) + sum(self._usage(p) for p in me.children(recursive=True))
        self.peak = max(self.peak, total)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def run(rows: int, data_dir: Path, batch_size: int, workers: int = 2) -> tuple[float, int]:
    """Generate `rows` rows (in a subprocess), then run the feed on a fresh local Ray."""
    from bench.feed import product

    if not any(data_dir.glob("*.parquet")):  # --keep reuses logs from an earlier run
        command = ["generate", "--out", str(data_dir), "--rows", str(rows), "--seed", "0"]
        subprocess.run([sys.executable, "-m", "pipeline.cli", *command], check=True, cwd=ROOT)
    overrides = [
        f"data.path={data_dir}",
        f"data.batch_size={batch_size}",
        "data.cache_budget_gb=0.001",  # the data is far above the budget: it streams
    ]
    address = os.environ.get("RAY_ADDRESS")
    with tempfile.TemporaryDirectory(prefix="adatt-ingest-") as out, PeakMemory() as memory:
        figures = product(overrides, ROOT / "configs" / "synthetic.yaml", workers, Path(out))
    # start_ray put the instance's address in RAY_ADDRESS; the next size starts its own.
    if address is None:
        os.environ.pop("RAY_ADDRESS", None)
    assert figures["cache"] == "off", figures
    rate = figures["first"]
    print(
        f"rows={rows:,} feed_rows_per_s={rate:,.0f} peak_mem_mib={memory.peak / 2**20:,.0f}",
        flush=True,
    )
    return rate, memory.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2, help="train workers (default 2)")
    parser.add_argument("--keep", type=Path, help="write the logs here instead of a temp dir")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    results = []
    with tempfile.TemporaryDirectory(prefix="adatt-bench-") as tmp:
        for rows in args.rows:
            data_dir = (args.keep or Path(tmp)) / f"logs-{rows}"
            results.append(run(rows, data_dir, args.batch_size, args.workers))
    rate = results[-1][0]
    growth = results[-1][1] / results[0][1]
    print(f"ingest_rows_per_s={rate:.0f} mem_growth_10x={growth:.3f}")


if __name__ == "__main__":
    main()
