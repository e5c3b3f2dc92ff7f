"""Feed benchmark: the input pipeline as `adatt train` runs it, with no model.

For each schema (synthetic; Census-Income when `../shared/data` has it; a wide production-like
log of this bench's making: 200 dense, 30 categorical of 1e6-1e7 distinct ids, 2 multi-hot,
6 tasks), over the same Parquet files:

- **product**: Parquet -> the driver's row pass and epoch plan (`fit`) -> Ray Train's
  workers (2 x 0.5 CPU on a 2-CPU machine) -> each worker's `WorkerFeed`, built by the
  training loop's own `make_feed` (per-worker Ray Data streams, read and preprocess fused,
  packed blocks, shuffle) -> batches on the worker's device: a first epoch (its train
  batches, filling the epoch cache where the rows fit, then the validation and test passes),
  the workers starting it together (a barrier, as DDP's steps keep them), after an untimed
  pass over the train and test rows that starts the workers' and Ray Data's processes. The
  figure is the median of `--repeats` first epochs (a new feed each, so each fills its
  cache). Epochs 2 to 7 (train and validation) follow from the cache (`data.cache: auto`);
  their figure is the median epoch's (each takes tens of milliseconds, so one epoch that
  Ray's background work preempts moves a sum of two by half).
- **one core**: one process, one core, no Ray: pyarrow reads the columns the preprocessing
  reads of each file (as the product does: hashed string columns as their dictionary where
  it is small, `feed.open_parquet`; not the split column, which it never uses), the
  product's `Preprocessor.transform`, `Layout.pack`;
  `--repeats` passes before the product and as many after it (a fresh process each time),
  the median of all.

Prints rows/s and rows/s per CPU of each, then `cache_epoch2_vs_epoch1=` (synthetic: the
median cached epoch over the first), and last `feed_vs_single_core=`: the product on all the
machine's CPUs over the one-core pipeline, synthetic schema.

    python bench/feed.py [--rows 1000000] [--wide-rows 200000] [--batch-size 4096]
                         [--repeats 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RAW_CENSUS = ROOT.parent / "shared" / "data" / "census-income"
WIDE_DENSE, WIDE_CATEGORICAL, WIDE_TASKS = 200, 30, 6
LATER_EPOCHS = 6  # cached epochs timed after the first


def single_core(config_overrides: list[str], config_path: Path, repeats: int) -> dict:
    """The one-core pipeline over every file of the config: read, transform, pack; the
    median of `repeats` passes."""
    import pyarrow as pa
    import torch

    from pipeline.config import load_config
    from pipeline.data.collate import Layout
    from pipeline.data.feed import dictionary_candidates, open_parquet
    from pipeline.data.fit import fit_preprocessor
    from pipeline.data.validate import check_schema

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    torch.set_num_threads(1)
    config = load_config(config_path, config_overrides)
    files = check_schema(config.data)
    preprocessor = fit_preprocessor(config.data, files)
    layout = Layout.of(preprocessor.empty())
    columns = config.data.columns(labels=True)
    candidates = [c for c in dictionary_candidates(config.data) if c in columns]
    passes = []
    for _ in range(repeats):
        started, rows = time.perf_counter(), 0
        for path in files.paths:
            # The product's read: string columns as their dictionary where it is small.
            table = open_parquet(path, candidates).read(columns=columns, use_threads=False)
            packed = layout.pack(preprocessor.transform(table))
            rows += len(packed["float32"])
        passes.append(rows / (time.perf_counter() - started))
    return {"rows_per_s": statistics.median(passes), "passes": passes}


def _feed_loop(loop_config: dict) -> None:
    """A train worker that only takes batches: the product's `make_feed`, as `train_loop`.
    The workers start each timed pass together (a barrier), as DDP's steps keep them."""
    import ray.train
    import torch
    import torch.distributed as dist

    from pipeline.config import parse_config
    from pipeline.training.loop import EVAL_BATCHES_PER_TRAIN_BATCH, make_feed, worker_device

    config = parse_config(loop_config["config"])
    device = worker_device(config.train)
    batch = config.data.batch_size
    eval_rows = batch * EVAL_BATCHES_PER_TRAIN_BATCH

    def rows_of(batches) -> int:
        total = 0
        for b in batches:
            total += len(b["weight"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return total

    def timed(feed, epoch: int, evaluations: tuple[str, ...]) -> list[float]:
        """An epoch's train batches, then the evaluation passes: [rows, seconds]."""
        dist.barrier()
        started = time.perf_counter()
        rows = rows_of(feed.train(epoch, batch))
        rows += sum(rows_of(feed.evaluation(split, eval_rows)) for split in evaluations)
        return [rows, time.perf_counter() - started]

    # Warm-up, untimed: a pass over the train rows (of another epoch, not cached) and the
    # test rows starts Ray Data's processes, as a run's first minutes do.
    uncached = config.model_copy(update={"data": config.data.model_copy(update={"cache": "off"})})
    warm = make_feed(loop_config, uncached, device)
    rows_of(warm.train(0, batch))
    rows_of(warm.evaluation("test", eval_rows))
    figures: dict = {"first": []}
    for _ in range(loop_config["repeats"]):
        # A run's first epoch: the train rows (filling the cache where they fit), then the
        # validation and test passes; a new feed each time, so each fills its cache again.
        feed = make_feed(loop_config, config, device)
        figures["cache"] = feed.cache
        figures["first"].append(timed(feed, 1, ("validation", "test")))
    # Epochs 2 to 7 of the last feed: from its cache where the rows fit.
    figures["later"] = [timed(feed, epoch, ("validation",)) for epoch in range(2, 2 + LATER_EPOCHS)]
    context = ray.train.get_context()
    out = Path(loop_config["out"]) / f"rank{context.get_world_rank()}.json"
    out.write_text(json.dumps(figures))


def product(
    config_overrides: list[str], config_path: Path, workers: int, out: Path, repeats: int = 1
) -> dict:
    """The product's feed on a fresh local Ray with every CPU of the machine: the median of
    `repeats` first epochs, and the two cached epochs after them."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.config import load_config
    from pipeline.data.fit import fit
    from pipeline.data.validate import check_schema
    from pipeline.session import start_ray
    from pipeline.training.driver import plan_loop

    config = load_config(config_path, [*config_overrides, f"train.num_workers={workers}"])
    files = check_schema(config.data)
    preprocessor, counts = fit(config.data, files)
    start_ray()
    _, plan, loop_config = plan_loop(config, preprocessor, counts)
    out.mkdir(parents=True, exist_ok=True)
    TorchTrainer(
        _feed_loop,
        train_loop_config={**loop_config, "out": str(out), "repeats": repeats},
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.num_workers,
            use_gpu=plan.use_gpu,
            resources_per_worker=plan.resources(),
        ),
        run_config=ray.train.RunConfig(storage_path=str(out / "runs"), name="feed"),
    ).fit()
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    ray.shutdown()

    def together(passes: list[list[float]]) -> dict:
        rows = sum(rows for rows, _ in passes)
        seconds = max(seconds for _, seconds in passes)  # the slowest worker ends the pass
        return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds}

    firsts = [together([r["first"][i] for r in ranks]) for i in range(repeats)]
    later = [together([r["later"][i] for r in ranks]) for i in range(LATER_EPOCHS)]
    return {
        "cpus": loop_config["cluster_cpus"],
        "cache": ranks[0]["cache"],
        "first": statistics.median(e["rows_per_s"] for e in firsts),
        "firsts": [e["rows_per_s"] for e in firsts],
        "later": statistics.median(e["rows_per_s"] for e in later),
    }


def write_wide_logs(out: Path, rows: int, seed: int = 0) -> None:
    """A production-width ranking log: 200 dense, 30 categorical (1e6-1e7 distinct ids), 2
    multi-hot lists, 6 binary tasks, a user id and a day; 16 files."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = 16
    for f in range(files):
        n = rows // files + (f < rows % files)
        columns = {
            "user_id": rng.integers(0, 2_000_000, n),
            "day": np.full(n, f"2024-01-{f + 1:02d}"),
        }
        for j in range(WIDE_DENSE):
            columns[f"d{j}"] = rng.standard_normal(n).astype(np.float32)
        for j in range(WIDE_CATEGORICAL):
            cardinality = int(10 ** (6 + j / (WIDE_CATEGORICAL - 1)))  # 1e6 .. 1e7
            columns[f"c{j}"] = rng.integers(0, cardinality, n)
        for j in range(2):
            lengths = rng.integers(0, 9, n)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            values = pa.array(rng.integers(0, 5_000_000, offsets[-1]))
            columns[f"m{j}"] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)
        for j in range(WIDE_TASKS):
            columns[f"t{j}"] = (rng.random(n) < 0.1 + 0.05 * j).astype(np.int8)
        pq.write_table(pa.table(columns), out / f"part-{f:02d}.parquet", row_group_size=65_536)


def wide_config(out: Path, logs: Path, buckets: int = 2_000_000) -> Path:
    """The wide schema's training config (`buckets` rows per categorical table, half as many
    per multi-hot table)."""
    import yaml

    config = {
        "data": {
            "path": str(logs),
            "dense": [{"column": f"d{j}"} for j in range(WIDE_DENSE)],
            "categorical": [
                {"column": f"c{j}", "buckets": buckets, "dim": 16} for j in range(WIDE_CATEGORICAL)
            ],
            "multi_hot": [
                {"column": f"m{j}", "buckets": buckets // 2, "dim": 16} for j in range(2)
            ],
            "tasks": [{"name": f"t{j}"} for j in range(WIDE_TASKS)],
            "split": {"method": "hash", "column": "user_id", "validation_fraction": 0.1},
            "group_column": "user_id",
        }
    }
    path = out / "wide.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def schemas(args: argparse.Namespace, work: Path) -> list[tuple[str, Path, list[str]]]:
    """(name, config, overrides) of each schema, its logs written under `work` once."""
    from pipeline.datasets.synthetic import generate_logs

    batch = f"data.batch_size={args.batch_size}"
    synthetic = work / "synthetic"
    if not any(synthetic.glob("*.parquet")):
        generate_logs(synthetic, rows=args.rows, seed=0)
    out = [("synthetic", ROOT / "configs" / "synthetic.yaml", [f"data.path={synthetic}", batch])]
    census = work / "census"
    if any(RAW_CENSUS.glob("census-income.data*")):
        if not any(census.rglob("*.parquet")):
            from pipeline.datasets.census import convert_census

            convert_census(RAW_CENSUS, census)
        out.append(("census", ROOT / "configs" / "census.yaml", [f"data.path={census}", batch]))
    wide = work / "wide"
    if not any(wide.glob("*.parquet")):
        write_wide_logs(wide, args.wide_rows)
    out.append(("wide", wide_config(work, wide), [batch]))
    return out


def _in_subprocess(function: str, repeats: int, *args: str) -> dict:
    """Run one measurement in a fresh process (its own Ray, its own thread settings)."""
    command = [sys.executable, __file__, "--repeats", str(repeats), "--measure", function, *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"{function} failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="synthetic rows")
    parser.add_argument("--wide-rows", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="passes per figure (median)")
    parser.add_argument("--keep", type=Path, help="write the logs here instead of a temp dir")
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    if args.measure:
        function, config, overrides, *rest = args.measure
        if function == "single_core":
            result = single_core(json.loads(overrides), Path(config), args.repeats)
        else:
            result = product(
                json.loads(overrides), Path(config), int(rest[0]), Path(rest[1]), args.repeats
            )
        print("RESULT " + json.dumps(result), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="adatt-feed-") as tmp:
        work = args.keep or Path(tmp)
        ratios = {}
        for name, config, overrides in schemas(args, work):
            encoded = json.dumps(overrides)
            before = _in_subprocess("single_core", args.repeats, str(config), encoded)
            out = str(work / f"out-{name}")
            feed = _in_subprocess(
                "product", args.repeats, str(config), encoded, str(args.workers), out
            )
            # Measured again after the product, and the median of both sets of passes: the
            # machine's speed drifts by tens of percent over minutes (one core: 1.2M-2.1M
            # rows/s on one day), and the ratio should not depend on which came first.
            after = _in_subprocess("single_core", args.repeats, str(config), encoded)
            one = {"rows_per_s": statistics.median(before["passes"] + after["passes"])}
            first, later, cpus = feed["first"], feed["later"], feed["cpus"]
            print(
                f"{name:<9} one_core={one['rows_per_s']:>11,.0f} rows/s   "
                f"product={first:>11,.0f} rows/s on {cpus:g} CPUs ({first / cpus:,.0f} per CPU)   "
                f"cached epochs={later:>13,.0f} rows/s (cache: {feed['cache']})   "
                f"product/one_core={first / one['rows_per_s']:.2f}",
                flush=True,
            )
            ratios[name] = (first / one["rows_per_s"], later / first)
    print(f"cache_epoch2_vs_epoch1={ratios['synthetic'][1]:.1f}")
    print(f"feed_vs_single_core={ratios['synthetic'][0]:.3f}")


if __name__ == "__main__":
    main()
