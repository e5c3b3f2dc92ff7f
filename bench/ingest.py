"""Ingest benchmark: synthetic logs -> read + preprocess + iter_torch_batches on local Ray.

Generates 1M and then 10M rows (`--rows` to change), streams every row of each through the
train, validation and test datasets (after a one-batch warm-up that starts Ray's workers) of `configs/synthetic.yaml`, and prints rows/s and the
peak memory of the whole process tree (this process, Ray's raylet/GCS and all workers;
proportional set size, so shared object-store pages count once). Last line:
`ingest_rows_per_s=<x> mem_growth_10x=<ratio>` (rows/s of the largest run; peak memory of
the largest run over the smallest).

    python bench/ingest.py [--rows 1000000 10000000] [--batch-size 1024] [--keep DIR]
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


def run(rows: int, data_dir: Path, batch_size: int) -> tuple[float, int]:
    """Generate `rows` rows (in a subprocess), then time the ingest on a fresh local Ray."""
    import ray

    from pipeline.config import load_config
    from pipeline.data.fit import fit_preprocessor
    from pipeline.data.ingest import batch_layout, build_datasets, iter_batches
    from pipeline.data.validate import check_schema

    if not any(data_dir.glob("*.parquet")):  # --keep reuses logs from an earlier run
        command = ["generate", "--out", str(data_dir), "--rows", str(rows), "--seed", "0"]
        subprocess.run([sys.executable, "-m", "pipeline.cli", *command], check=True, cwd=ROOT)
    cfg = load_config(ROOT / "configs" / "synthetic.yaml", [f"data.path={data_dir}"]).data
    files = check_schema(cfg)
    started = time.perf_counter()
    preprocessor = fit_preprocessor(cfg, files)
    fit_s = time.perf_counter() - started

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        with PeakMemory() as memory:
            datasets = build_datasets(cfg, preprocessor, files)
            # Warm-up outside the timer: start Ray's worker processes and their imports.
            layout = batch_layout(preprocessor)
            for _ in iter_batches(datasets["test"].limit(1), layout, batch_size, "cpu"):
                pass
            started = time.perf_counter()
            seen = 0
            for name, ds in datasets.items():
                batches = iter_batches(ds, layout, batch_size, "cpu", shuffle=name == "train")
                for batch in batches:
                    seen += len(batch["weight"])
            seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    assert seen == rows, (seen, rows)
    rate = rows / seconds
    print(
        f"rows={rows:,} fit_s={fit_s:.2f} ingest_s={seconds:.2f} rows_per_s={rate:,.0f} "
        f"peak_mem_mib={memory.peak / 2**20:,.0f}",
        flush=True,
    )
    return rate, memory.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--keep", type=Path, help="write the logs here instead of a temp dir")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    results = []
    with tempfile.TemporaryDirectory(prefix="adatt-bench-") as tmp:
        for rows in args.rows:
            data_dir = (args.keep or Path(tmp)) / f"logs-{rows}"
            results.append(run(rows, data_dir, args.batch_size))
    rate = results[-1][0]
    growth = results[-1][1] / results[0][1]
    print(f"ingest_rows_per_s={rate:.0f} mem_growth_10x={growth:.3f}")


if __name__ == "__main__":
    main()
