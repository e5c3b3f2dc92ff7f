"""Metrics agree with scikit-learn, skip masked rows, and are exact across workers."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import log_loss, mean_squared_error, roc_auc_score

from pipeline.training.metrics import MultiTaskMetrics, TaskKind, binary_entropy

TASKS = [TaskKind("click", "binary"), TaskKind("like", "binary"), TaskKind("watch", "regression")]


def _data(seed: int, n: int = 3000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 3, generator=g)
    labels = torch.stack(
        [
            (torch.rand(n, generator=g) < torch.sigmoid(logits[:, 0])).float(),
            (torch.rand(n, generator=g) < torch.sigmoid(0.5 * logits[:, 1])).float(),
            logits[:, 2] + torch.randn(n, generator=g),
        ],
        dim=1,
    )
    mask = (torch.rand(n, 3, generator=g) < torch.tensor([1.0, 0.4, 0.7])).float()
    return logits, labels, mask


def _expected(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    out = {}
    for i, task in enumerate(TASKS):
        keep = mask[:, i].bool().numpy()
        y, z = (
            labels[keep, i].numpy().astype(np.float64),
            logits[keep, i].numpy().astype(np.float64),
        )
        if task.type == "binary":
            p = 1 / (1 + np.exp(-z))
            ll = log_loss(y, p)
            out[f"val/{task.name}/auc"] = roc_auc_score(y, p)
            out[f"val/{task.name}/logloss"] = ll
            out[f"val/{task.name}/ne"] = ll / binary_entropy(y.mean())
            out[f"val/{task.name}/calibration"] = p.mean() / y.mean()
        else:
            out[f"val/{task.name}/mse"] = mean_squared_error(y, z)
        out[f"val/{task.name}/count"] = float(keep.sum())
    return out


def _check(got: dict[str, float], want: dict[str, float]) -> None:
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    aucs = [want["val/click/auc"], want["val/like/auc"]]
    assert got["val/mean_auc"] == pytest.approx(sum(aucs) / 2, rel=1e-5)


def test_metrics_match_sklearn_on_observed_rows_only() -> None:
    logits, labels, mask = _data(0)
    metrics = MultiTaskMetrics(TASKS, torch.device("cpu"))
    for chunk in range(0, len(logits), 512):
        sl = slice(chunk, chunk + 512)
        metrics.update(logits[sl], labels[sl], mask[sl])
    _check(metrics.compute("val"), _expected(logits, labels, mask))


def test_masked_label_values_do_not_change_metrics() -> None:
    logits, labels, mask = _data(1)
    scrambled = torch.where(mask > 0, labels, torch.full_like(labels, 7.0))
    a, b = (MultiTaskMetrics(TASKS, torch.device("cpu")) for _ in range(2))
    a.update(logits, labels, mask)
    b.update(logits, scrambled, mask)
    assert a.compute("val") == b.compute("val")


def test_binary_entropy() -> None:
    assert binary_entropy(0.5) == pytest.approx(math.log(2))
    assert binary_entropy(0.0) == 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, queue: mp.Queue, cut: int = 1000) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    logits, labels, mask = _data(2)
    # Uneven shards with different score distributions: per-worker AUCs would not average
    # to the global AUC.
    sl = slice(0, cut) if rank == 0 else slice(cut, None)
    shift = 0.0 if rank == 0 else 1.5
    metrics = MultiTaskMetrics(TASKS, torch.device("cpu"))
    if len(logits[sl]):  # a worker with an empty shard never sees a batch
        metrics.update(logits[sl] + shift, labels[sl], mask[sl])
    queue.put((rank, metrics.compute("val")))
    dist.destroy_process_group()


@pytest.mark.parametrize("cut", [1000, 3000])  # 3000: the second worker's shard is empty
def test_metrics_are_exact_across_two_workers(cut: int) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue, cut)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    logits, labels, mask = _data(2)
    logits = logits.clone()
    logits[cut:] += 1.5
    want = _expected(logits, labels, mask)
    _check(results[0], want)
    assert results[0] == results[1]
