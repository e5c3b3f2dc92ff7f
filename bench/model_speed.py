"""Train-step speed of the batched AdaTT against the loop implementation (prints figures).

A step is forward, per-task BCE, backward and an Adam step; the loop implementation is
models/reference.py (one module per expert, gate and tower, as in the authors'
code) with the same weights. The models take turns step by step (so a noisy neighbour slows
both alike); each figure is the median of `--steps` steps after a warm-up.

    python bench/model_speed.py                      # CPU, 2 threads, the issue's table
    python bench/model_speed.py --device cuda --bf16 # on a GPU, bf16 autocast
    python bench/model_speed.py --compile            # also time torch.compile(batched)
    python bench/model_speed.py --balancing          # gradient-level task balancing

The last line is `min_speedup_vs_loop=<x>`. With `--balancing` the table is instead the
product's train step (`pipeline.training.step.TrainStep`, masked multi-task loss) under
each `train.loss_weighting`, and the last lines are `<method>_vs_fixed=<x>`, the ratio of
its median step time to `fixed`'s over every config and batch size (the largest ratio).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import FeatureSchema, build_model  # noqa: E402
from models.reference import loop_model_from  # noqa: E402

# (name, input width, tasks, model section)
CONFIGS = [
    (
        "census-like",
        482,
        3,
        {"experts_per_task": 2, "shared_experts": 0, "expert_dims": [128, 64], "tower_dims": [32]},
    ),
    (
        "industrial-like",
        512,
        3,
        {"experts_per_task": 1, "shared_experts": 1, "expert_dims": [256, 128], "tower_dims": [64]},
    ),
    (
        "wide",
        512,
        4,
        {
            "experts_per_task": 4,
            "shared_experts": 1,
            "expert_dims": [256, 256, 128],
            "tower_dims": [64],
        },
    ),
]


def make_step(model, batch, labels, device, bf16):
    """A closure running one full train step of `model` (forward, BCE, backward, Adam)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        autocast = (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16)
            if bf16
            else contextlib.nullcontext()
        )
        with autocast:
            logits = model(batch).float()
        loss = sum(
            F.binary_cross_entropy_with_logits(logits[:, t], labels[:, t])
            for t in range(labels.shape[1])
        )
        loss.backward()
        optimizer.step()

    return step


def time_steps(steps, repeats: int, warmup: int, device) -> list[float]:
    """Median seconds per step of each closure, run in alternation.

    The closures take turns step by step, so a slow spell of a shared machine slows all of
    them alike instead of skewing the ratio between them.
    """
    times: list[list[float]] = [[] for _ in steps]
    for round_ in range(warmup + repeats):
        for index, step in enumerate(steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ >= warmup:
                times[index].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def balancing_table(args, device: torch.device) -> None:
    """Step time of `fixed` and of each gradient-level method, the product's step object."""
    from pipeline.config import GRADIENT_METHODS
    from pipeline.training.balancing import GradientBalancer
    from pipeline.training.losses import MultiTaskLoss, TrainingModel
    from pipeline.training.step import TrainStep

    methods = ["fixed", *GRADIENT_METHODS]
    print(f"{'config':<16} {'batch':>6} " + " ".join(f"{m + ' ms':>11}" for m in methods))
    ratios: dict[str, list[float]] = {m: [] for m in GRADIENT_METHODS}
    for name, width, tasks, section in CONFIGS:
        schema = FeatureSchema(num_dense=width, tasks=tuple(f"task{t}" for t in range(tasks)))
        for batch_size in args.batches:
            batch = {
                "dense": torch.randn(batch_size, width, device=device),
                "labels": torch.randint(0, 2, (batch_size, tasks), device=device).float(),
                "mask": torch.ones(batch_size, tasks, device=device),
            }
            steps = []
            for method in methods:
                torch.manual_seed(0)
                network = build_model({"name": "adatt", **section}, schema)
                module = TrainingModel(network, MultiTaskLoss(["binary"] * tasks, [1.0] * tasks))
                module = module.to(device)
                balancer = None
                if method != "fixed":
                    balancer = GradientBalancer(method, module, [1.0] * tasks)
                optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
                step = TrainStep(
                    module,
                    optimizer,
                    device,
                    "eager",
                    bf16=args.bf16,
                    rows=batch_size,
                    num_tasks=tasks,
                    balancer=balancer,
                )
                steps.append(lambda step=step, batch=batch: step(batch))
            times = time_steps(steps, args.steps, args.warmup, device)
            for method, seconds in zip(methods[1:], times[1:], strict=True):
                ratios[method].append(seconds / times[0])
            cells = " ".join(f"{t * 1e3:>11.1f}" for t in times)
            print(f"{name:<16} {batch_size:>6} {cells}", flush=True)
    for method, values in ratios.items():
        print(f"{method}_vs_fixed={max(values):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[512, 4096])
    parser.add_argument(
        "--balancing", action="store_true", help="time train.loss_weighting's methods instead"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.balancing:
        print(f"device={device} threads={args.threads} bf16={args.bf16} steps={args.steps}")
        balancing_table(args, device)
        return

    header = f"{'config':<16} {'batch':>6} {'batched ms':>11} {'loop ms':>9} {'speedup':>8}"
    if args.compile:
        header += f" {'compiled ms':>12}"
    print(f"device={device} threads={args.threads} bf16={args.bf16} steps={args.steps}")
    print(header)
    speedups = []
    for name, width, tasks, section in CONFIGS:
        torch.manual_seed(0)
        schema = FeatureSchema(num_dense=width, tasks=tuple(f"task{t}" for t in range(tasks)))
        batched = build_model({"name": "adatt", **section}, schema)
        loop = loop_model_from(batched).to(device)
        batched = batched.to(device)
        for batch_size in args.batches:
            batch = {"dense": torch.randn(batch_size, width, device=device)}
            labels = torch.randint(0, 2, (batch_size, tasks), device=device).float()
            steps = [
                make_step(batched, batch, labels, device, args.bf16),
                make_step(loop, batch, labels, device, args.bf16),
            ]
            if args.compile:
                steps.append(make_step(torch.compile(batched), batch, labels, device, args.bf16))
            fast, slow, *compiled = time_steps(steps, args.steps, args.warmup, device)
            speedups.append(slow / fast)
            row = f"{name:<16} {batch_size:>6} {fast * 1e3:>11.1f} {slow * 1e3:>9.1f} {slow / fast:>7.2f}x"
            if compiled:
                row += f" {compiled[0] * 1e3:>12.1f}"
            print(row, flush=True)
    print(f"min_speedup_vs_loop={min(speedups):.2f}")


if __name__ == "__main__":
    main()
