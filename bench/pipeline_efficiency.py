"""How much of the model's raw training speed survives the product's pipeline.

The same AdaTT model, data and batch size trained two ways:
  1. through `adatt train` (Ray Data streaming -> Ray Train workers, MLflow tracking),
     steady-state epochs only (epoch 1 is warm-up);
  2. a plain in-memory PyTorch loop over preloaded tensors (no Ray, no I/O).
Both get the same compute for the model: torch threads = the worker's CPUs (`--threads`
overrides both). The pipeline's data path runs on the machine's other CPUs, as it would
in a real job; `--threads 2` on a 2-CPU machine instead makes the data path and the model
share the cores the in-memory loop has for itself alone.
Prints both samples/s, the start-up time of the pipeline, and last
`pipeline_vs_inmemory=<ratio>` (target >= 0.8).

    python bench/pipeline_efficiency.py [--rows 300000] [--epochs 4] [--threads N]
    python bench/pipeline_efficiency.py --gpu --rows 4000000 --cpus-per-worker 8 \
        --set data.batch_size=8192          # one GPU: both paths on it, bf16 autocast

With `--gpu` the in-memory loop keeps its tensors on the GPU and steps under the training
loop's own bf16 autocast (`pipeline.training.step.autocast`); `adatt train` runs with `train.use_gpu=true`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")

from pipeline.config import load_config  # noqa: E402
from pipeline.data.fit import fit_preprocessor  # noqa: E402
from pipeline.data.sample import read_split  # noqa: E402
from pipeline.data.validate import check_schema  # noqa: E402
from pipeline.datasets.synthetic import generate_logs  # noqa: E402
from pipeline.training.checkpoint import load_checkpoint  # noqa: E402
from pipeline.training.driver import run_training  # noqa: E402
from pipeline.training.losses import TrainingModel, build_training_model  # noqa: E402
from pipeline.training.optim import embedding_tables, make_optimizer  # noqa: E402
from pipeline.training.step import autocast  # noqa: E402


def in_memory_samples_per_s(
    config, threads: int, epochs: int = 3, device: torch.device | None = None
) -> float:
    """Train on preloaded tensors (on `device`, default CPU); median samples/s of the
    epochs after the first."""
    device = device or torch.device("cpu")
    torch.set_num_threads(threads)
    files = check_schema(config.data)
    preprocessor = fit_preprocessor(config.data, files)
    columns = config.data.columns(labels=True)
    table = read_split(config.data, files, "train", columns)
    arrays = preprocessor.transform(table)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}
    rows = len(tensors["labels"])
    torch.manual_seed(config.train.seed)
    module: TrainingModel = build_training_model(config).to(device)
    optimizer = make_optimizer(module.parameters(), config.train, embedding_tables(module))
    batch_size = config.data.batch_size
    rates = []
    for _ in range(epochs):
        order = torch.randperm(rows, device=device)
        start = time.perf_counter()
        for i in range(0, rows, batch_size):
            index = order[i : i + batch_size]
            batch = {k: v[index] for k, v in tensors.items()}
            with autocast(device, config.train.bf16):
                total, _, _ = module(batch)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(rows / (time.perf_counter() - start))
    return float(np.median(rates[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument(
        "--threads", type=int, help="torch threads of both paths (default: the worker's CPUs)"
    )
    parser.add_argument("--gpu", action="store_true", help="both paths on one GPU, bf16")
    parser.add_argument("--set", action="append", default=[], help="config override")
    args = parser.parse_args()
    device = torch.device("cuda" if args.gpu else "cpu")
    threads = args.threads or max(1, int(args.cpus_per_worker))

    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp) / "logs"
        generate_logs(logs, rows=args.rows, seed=0)
        config = load_config(
            REPO / "configs" / "synthetic.yaml",
            [
                f"data.path={logs}",
                f"train.epochs={args.epochs}",
                f"train.num_workers={args.workers}",
                f"train.cpus_per_worker={args.cpus_per_worker}",
                f"train.threads_per_worker={threads}",
                f"train.storage_path={tmp}/runs",
                f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db",
                "tracking.log_model=false",
                f"train.use_gpu={str(args.gpu).lower()}",
                *args.set,
            ],
        )
        inmemory = in_memory_samples_per_s(config, threads, args.epochs, device)
        started = time.perf_counter()
        outcome = run_training(config)
        wall = time.perf_counter() - started
        history = load_checkpoint(outcome.checkpoint_path).history

    steady = history[1:] or history
    pipeline_rate = float(np.median([h["train/samples_per_s"] for h in steady]))
    busy = sum(h["train/seconds"] + h["val/seconds"] for h in history)
    print(
        f"config: {config.model.name} {config.model.expert_dims} batch {config.data.batch_size}, "
        f"{args.rows:,} rows, {args.workers} worker(s) x {args.cpus_per_worker} CPU, "
        f"{threads} torch thread(s) per path, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name()} (bf16 autocast)" if args.gpu else "")
    )
    print(f"{'path':<22}{'samples/s':>12}")
    print(f"{'in-memory torch loop':<22}{inmemory:>12,.0f}")
    print(f"{'adatt train (steady)':<22}{pipeline_rate:>12,.0f}")
    print(
        f"adatt train wall time {wall:.1f} s; training+validation {busy:.1f} s; "
        f"start-up and wrap-up {wall - busy:.1f} s"
    )
    print(f"pipeline_vs_inmemory={pipeline_rate / inmemory:.3f}")


if __name__ == "__main__":
    main()
