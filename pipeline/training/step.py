"""One training step as an object: the model, its multi-task loss, the optimizer and the
precision, run eagerly, through `torch.compile`, or captured whole as one CUDA graph.

The Ray Train loop (`pipeline.training.loop.WorkerRun.train_epoch`) calls it once per batch, and
`bench/gpu_step.py` builds the same object without Ray, so a bench figure is a figure of
the product.

Modes (`train.step_mode`):

- `eager`: forward under bf16 autocast on a GPU (fp32 on CPU), the masked multi-task loss,
  backward, an optional gradient-norm clip, the optimizer step. What CPUs run.
- `compile`: the same with the training module compiled (`torch.compile`, CUDA graphs
  inside compiled regions on a GPU); batches are padded to one shape.
- `cuda_graph`: forward, loss, backward, clip and `Adam(capturable=True)`'s step captured
  once as one CUDA graph, then replayed for every batch: each batch is copied into static
  input buffers. Capture follows PyTorch's whole-network recipe: warm-up steps on a side
  stream, then capture; the warm-up's
  changes to weights and optimizer state are undone before the first real step, so the
  run trains exactly the steps it would eagerly. The learning rate lives in a device
  tensor, so a schedule changes it between replays without a new capture.
- `auto`: `cuda_graph` on one GPU worker with dense tables, else `eager` (a graph is not
  captured under DDP: `check_graph_workers`).

Shapes: graph and compile modes pad a short batch (the last of an epoch) to the captured
number of rows with rows of weight 0 and mask 0, which change no loss or gradient.
Loss sums stay on the device (`sums`), read once per epoch: no step waits for the host.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.data.collate import pad
from pipeline.errors import ConfigError

if TYPE_CHECKING:  # torchjd and its solvers load only where balancing is configured
    from pipeline.training.balancing import GradientBalancer

WARMUP_STEPS = 3


def resolve_step_mode(
    mode: str,
    device: torch.device,
    embeddings: str = "dense",
    balancing: bool = False,
    workers: int = 1,
) -> str:
    """The mode a step runs in; ConfigError naming `train.step_mode` where it cannot run.
    `balancing`: a gradient-level loss weighting (one backward per task: eager only);
    `workers`: DDP's world size (a captured graph needs one GPU worker: see
    `check_graph_workers`)."""
    sharded = embeddings == "torchrec"
    if mode == "auto":
        whole = device.type == "cuda" and not (sharded or balancing) and workers == 1
        return "cuda_graph" if whole else "eager"
    check_graph_workers(mode, workers)
    if mode != "eager" and balancing:
        raise ConfigError(
            f"train.step_mode: {mode} runs one backward, but a gradient-level "
            "train.loss_weighting needs one per task; use eager (or auto)"
        )
    if mode == "cuda_graph" and device.type != "cuda":
        raise ConfigError(
            "train.step_mode: cuda_graph captures the train step on a GPU, but the workers "
            "train on CPU; use eager (or auto)"
        )
    if mode != "eager" and sharded:
        raise ConfigError(
            f"train.step_mode: {mode} does not apply to model.embeddings: torchrec (its "
            "tables update inside the backward pass); use eager (or auto)"
        )
    return mode


def check_graph_workers(mode: str, workers: int) -> None:
    """ConfigError naming `train.step_mode` for a captured graph on several workers.

    PyTorch's recipe for capturing a DDP step has three parts: NCCL's asynchronous error
    handling off before the process group starts, DDP built in a side-stream context, and
    11 eager warm-up steps. Ray Train builds the process group and DDP
    (`prepare_model`), so the first two are not ours to set, and no multi-GPU machine was
    there to show the capture correct: one GPU worker only (docs/gpu.md).
    """
    if mode == "cuda_graph" and workers > 1:
        raise ConfigError(
            f"train.step_mode: cuda_graph captures one worker's step, and the run has "
            f"{workers} GPU workers (DDP); use auto (eager steps on several workers) or "
            "train.num_workers: 1"
        )


def autocast(device: torch.device, bf16: bool) -> Any:
    """bf16 autocast on a GPU when asked, else nothing. Only training steps run under it;
    evaluation runs in float32, the precision `adatt predict` scores in. Its cache of cast
    weights is off: a captured graph must cast the weights it reads at every replay."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return nullcontext()


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Prepare Adam / AdamW for a captured step: `capturable`, the learning rates as device
    tensors (a schedule fills them in place), the step counts on the device."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = state["step"].to(device=device, dtype=torch.float32)


class TrainStep:
    """One optimisation step over a batch, in the configured mode.

    Args:
        module: the training module (`losses.TrainingModel`, maybe DDP-wrapped):
            `module(batch) -> (total loss, per-task losses, outputs)`.
        optimizer: its optimizer (`zero_grad`, `step`, `param_groups`).
        device: where the step runs.
        mode: a resolved mode (`resolve_step_mode`): eager, compile or cuda_graph.
        bf16: autocast to bf16 on a GPU.
        grad_clip: clip the gradients' total norm to this (None: no clip).
        rows: the rows of a full batch (the captured shape in graph and compile modes).
        num_tasks: the tasks (for the loss sums).
        balancer: a gradient-level task balancing (`balancing.GradientBalancer`), which
            replaces the backward of the total loss (eager mode only), or None.

    Call it with a batch (a dict of tensors on `device`, at most `rows` rows); read the
    summed losses with `sums()`.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: Any,
        device: torch.device,
        mode: str,
        *,
        bf16: bool = True,
        grad_clip: float | None = None,
        rows: int,
        num_tasks: int,
        balancer: GradientBalancer | None = None,
    ) -> None:
        if balancer is not None and mode != "eager":
            raise ValueError(f"a gradient-level balancing runs eager steps, not {mode}")
        self.module, self.optimizer, self.device, self.mode = module, optimizer, device, mode
        self.balancer = balancer
        self.bf16, self.grad_clip, self.rows = bf16, grad_clip, rows
        self.forward = module
        if mode == "compile":  # CUDA graphs inside the compiled regions on a GPU
            compile_mode = "reduce-overhead" if device.type == "cuda" else None
            self.forward = torch.compile(module, dynamic=False, mode=compile_mode)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, torch.Tensor] = {}
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.task_sums = torch.zeros(num_tasks, dtype=torch.float64, device=device)
        if mode == "cuda_graph":
            make_capturable(optimizer, device)

    def _eager(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.balancer is not None:
            return self._balanced(batch)
        with autocast(self.device, self.bf16):
            total, per_task, _ = self.forward(batch)
        self.optimizer.zero_grad(set_to_none=self.mode != "cuda_graph")
        total.backward()
        self._clip()
        self.optimizer.step()
        return total.detach(), per_task.detach()

    def _balanced(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """An eager step whose update is the balancer's aggregate of the task gradients;
        DDP's own all-reduce is off (the balancer averages the Jacobian instead)."""
        with self.balancer.no_sync():
            with autocast(self.device, self.bf16):
                total, per_task, _ = self.forward(batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.balancer.backward(per_task)
        self._clip()
        self.optimizer.step()
        return total.detach(), per_task.detach()

    def _clip(self) -> None:
        if self.grad_clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)

    def __call__(self, batch: Mapping[str, torch.Tensor], rows: int | None = None) -> None:
        """One step on `batch`; `rows` is its number of real rows (default: all of them),
        by which its mean losses are weighted in `sums`."""
        real = rows if rows is not None else next(iter(batch.values())).shape[0]
        if self.mode == "eager":
            total, per_task = self._eager(batch)
        elif self.mode == "compile":
            total, per_task = self._eager(pad(batch, self.rows))
        else:
            total, per_task = self._replay(pad(batch, self.rows))
        self.loss_sum += total.double() * real
        self.task_sums += per_task.double() * real

    def sums(self) -> tuple[float, list[float]]:
        """(sum of total loss x rows, per-task sums) since the last call; resets them."""
        loss, tasks = float(self.loss_sum), self.task_sums.tolist()
        self.loss_sum.zero_()
        self.task_sums.zero_()
        return loss, tasks

    def _replay(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is None:
            self._capture(batch)
        for key, value in batch.items():
            self.static[key].copy_(value, non_blocking=True)
        self.graph.replay()
        return self.outputs

    def _capture(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Warm up on a side stream, capture one whole step, then undo the warm-up."""
        self.static = {k: v.clone() for k, v in batch.items()}
        saved = _snapshot(self.module, self.optimizer)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._eager(self.static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=False)
        with torch.cuda.graph(self.graph):
            self.outputs = self._eager(self.static)
        _restore(self.module, self.optimizer, saved)


def _snapshot(module: nn.Module, optimizer: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every parameter and optimizer-state tensor (to undo the warm-up in place:
    the graph holds their addresses)."""
    tensors = list(module.parameters())
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    return [(t, t.detach().clone()) for t in tensors]


def _restore(module: nn.Module, optimizer: Any, saved: list) -> None:
    """Put back what `_snapshot` saw, in place; state the warm-up created starts at zero."""
    seen = {id(t) for t, _ in saved}
    with torch.no_grad():
        for tensor, copy in saved:
            tensor.copy_(copy)
        for state in optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value) and id(value) not in seen:
                    value.zero_()
