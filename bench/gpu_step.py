"""The product's train step on a GPU: eager, compiled and one CUDA graph, and the feed.

Runs on any GPU machine with torch, pyarrow, numpy and pydantic (no Ray, no MLflow): it
builds the same `TrainStep` (`pipeline/training/step.py`) and the same batch packing and
device prefetch (`pipeline/data/collate.py`) the Ray Train loop uses.

- step: the census config (482 dense inputs, 3 tasks, m_t=2, m_s=1, experts [128, 64],
  tower [32]) and an 8-task config with id tables, at batches 512, 4096 and 32768, in
  eager, compile and cuda_graph modes (bf16 autocast, Adam): milliseconds per step
  (CUDA events, median of `--repeats` runs of `--steps` steps after warm-up) and TFLOP/s
  (FLOPs of one step counted by `torch.utils.flop_counter.FlopCounterMode`).
- feed: Arrow record batches, as Ray Data hands them, converted to numpy, packed into one
  pinned tensor per dtype by worker threads (Ray's prefetch threads) and copied to the GPU
  one batch ahead on a side stream (`Prefetcher`): samples/s at batch 4096.

    python bench/gpu_step.py                          # the table, about 3 minutes on an H200
    python bench/gpu_step.py --markdown docs/results/gpu.md
    python bench/gpu_step.py --check                  # also the CUDA tests of the step
                                                      # (and of the balanced step)

The last lines are `graph_vs_eager_4096=` and `census_step_ms_4096=`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import build_model  # noqa: E402
from models.config import CategoricalInput, FeatureSchema  # noqa: E402
from pipeline.config import TrainConfig  # noqa: E402
from pipeline.data.collate import Layout, Prefetcher  # noqa: E402
from pipeline.training.losses import MultiTaskLoss, TrainingModel  # noqa: E402
from pipeline.training.optim import embedding_tables, make_optimizer  # noqa: E402
from pipeline.training.step import TrainStep  # noqa: E402

MODEL = {"name": "adatt", "experts_per_task": 2, "shared_experts": 1, "tower_dims": [32]}
CONFIGS = {
    "census": (FeatureSchema(num_dense=482, tasks=("income", "married", "college")), [128, 64]),
    "8-task": (
        FeatureSchema(
            categorical=tuple(CategoricalInput(f"id{i}", 100_000, 16) for i in range(6)),
            num_dense=16,
            tasks=tuple(f"task{i}" for i in range(8)),
        ),
        [256, 128],
    ),
}
BATCHES = (512, 4096, 32768)
MODES = ("eager", "compile", "cuda_graph")


def arrays_for(schema: FeatureSchema, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random preprocessed rows in `Preprocessor.transform`'s layout."""
    rng = np.random.default_rng(seed)
    tasks = len(schema.tasks)
    out = {
        "dense": rng.standard_normal((rows, schema.num_dense), dtype=np.float32),
        "labels": (rng.random((rows, tasks)) < 0.3).astype(np.float32),
        "mask": np.ones((rows, tasks), np.float32),
        "weight": np.ones(rows, np.float32),
    }
    if schema.categorical:
        ids = [rng.integers(0, f.buckets, rows) for f in schema.categorical]
        out["categorical"] = np.stack(ids, axis=1).astype(np.int64)
    return out


def training_module(schema: FeatureSchema, dims: list[int], device: torch.device):
    torch.manual_seed(0)
    network = build_model({**MODEL, "expert_dims": dims}, schema)
    loss = MultiTaskLoss(["binary"] * len(schema.tasks), [1.0] * len(schema.tasks))
    return TrainingModel(network, loss).to(device)


def time_steps(step: TrainStep, batch: dict, steps: int, repeats: int) -> float:
    """Milliseconds per step: the median over `repeats` runs of `steps` steps."""
    for _ in range(3):
        step(batch)
    step.sums()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step(batch)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / steps)
    step.sums()
    return statistics.median(times)


def step_flops(module, optimizer, batch: dict, device: torch.device) -> int:
    """FLOPs of one eager step (forward and backward; the optimizer's are negligible)."""
    eager = TrainStep(module, optimizer, device, "eager", rows=1, num_tasks=1)
    with FlopCounterMode(display=False) as counter:
        eager._eager(batch)
    return counter.get_total_flops()


def bench_steps(args, device: torch.device) -> dict[tuple[str, int, str], float]:
    results = {}
    train = TrainConfig(lr=1e-3)
    for name, (schema, dims) in CONFIGS.items():
        for rows in BATCHES:
            arrays = arrays_for(schema, rows)
            batch = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
            flops = None
            for mode in MODES:
                if mode == "compile" and args.skip_compile:
                    continue
                module = training_module(schema, dims, device)
                optimizer = make_optimizer(module.parameters(), train, embedding_tables(module))
                if flops is None:
                    flops = step_flops(module, optimizer, batch, device)
                try:
                    step = TrainStep(
                        module, optimizer, device, mode, rows=rows, num_tasks=len(schema.tasks)
                    )
                    ms = time_steps(step, batch, args.steps, args.repeats)
                except Exception as err:  # one mode's failure must not lose the others
                    print(f"{name} batch={rows} {mode}: FAILED {type(err).__name__}: {err}")
                    continue
                results[name, rows, mode] = ms
                print(
                    f"{name:7s} batch={rows:6d} {mode:10s} {ms:8.3f} ms/step "
                    f"{rows / ms * 1e3:13,.0f} samples/s {flops / ms / 1e9:7.1f} TFLOP/s",
                    flush=True,
                )
    return results


def bench_feed(device: torch.device, rows: int = 4096, batches: int = 200, threads: int = 4):
    """Samples/s of Arrow batches -> numpy -> packed pinned tensors -> the GPU."""
    schema = CONFIGS["census"][0]
    arrays = arrays_for(schema, rows * 8)
    table = pa.table(
        {
            k: pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1])
            if v.ndim == 2
            else pa.array(v)
            for k, v in arrays.items()
        }
    )
    record_batches = [table.slice((i % 8) * rows, rows) for i in range(batches)]
    layout = Layout.of(arrays)

    def to_numpy(batch: pa.Table) -> dict[str, np.ndarray]:  # as Ray Data's numpy batch
        out = {}
        for name in batch.column_names:
            column = batch[name].combine_chunks()
            if pa.types.is_fixed_size_list(column.type):
                flat = column.flatten().to_numpy(zero_copy_only=False)
                out[name] = flat.reshape(len(column), column.type.list_size)
            else:
                out[name] = column.to_numpy(zero_copy_only=False)
        return out

    def collate(batch: pa.Table):
        return layout.pack(to_numpy(batch), pin=True)

    with ThreadPoolExecutor(threads) as pool:
        for _ in Prefetcher(pool.map(collate, record_batches[:10]), device):
            pass
        torch.cuda.synchronize()
        started = time.perf_counter()
        total = torch.zeros((), device=device)
        for packed in Prefetcher(pool.map(collate, record_batches), device):
            total += layout.unpack(packed)["dense"][0, 0]  # the step would read it here
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return rows * batches / seconds


def markdown(results: dict, feed: float, device: torch.device) -> str:
    name = torch.cuda.get_device_name(device)
    lines = [
        "# The train step on a GPU",
        "",
        f"`python bench/gpu_step.py` on {name}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}; bf16 autocast, Adam; ms per step (CUDA events, median).",
        "",
        "| config | batch | eager ms | compile ms | cuda_graph ms | graph vs eager | "
        "graph samples/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for config in CONFIGS:
        for rows in BATCHES:
            cells = [results.get((config, rows, m)) for m in MODES]
            shown = [f"{c:.3f}" if c is not None else "-" for c in cells]
            ratio = cells[0] / cells[2] if cells[0] and cells[2] else None
            rate = rows / cells[2] * 1e3 if cells[2] else None
            lines.append(
                f"| {config} | {rows} | {' | '.join(shown)} | "
                f"{f'{ratio:.2f}x' if ratio else '-'} | {f'{rate:,.0f}' if rate else '-'} |"
            )
    lines += ["", f"Feed alone (census rows, batch 4096): {feed:,.0f} samples/s.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--check", action="store_true", help="run the CUDA tests of the step")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_step.py needs a CUDA GPU")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    if args.check:
        paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        test = [
            "tests/pipeline/training/test_step.py",
            "tests/pipeline/training/test_balancing.py",
            *("-q", "-p", "no:cacheprovider"),
        ]
        done = subprocess.run([sys.executable, "-m", "pytest", *test], cwd=ROOT, env=env)
        print(f"cuda_tests_exit={done.returncode}", flush=True)
    results = bench_steps(args, device)
    feed = bench_feed(device)
    print(f"feed_samples_per_s_4096={feed:,.0f}")
    if args.markdown:
        args.markdown.write_text(markdown(results, feed, device))
    eager, graph = (
        results.get(("census", 4096, "eager")),
        results.get(("census", 4096, "cuda_graph")),
    )
    if eager and graph:
        print(f"graph_step_samples_per_s_4096={4096 / graph * 1e3:,.0f}")
        print(f"graph_vs_eager_4096={eager / graph:.2f}")
        print(f"census_step_ms_4096={graph:.3f}")


if __name__ == "__main__":
    main()
