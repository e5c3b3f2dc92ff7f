"""Metrics agree with scikit-learn, skip masked rows, and are exact across workers."""

from __future__ import annotations

import math
import time
from pathlib import Path
from queue import Empty

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import log_loss, mean_squared_error, roc_auc_score

from pipeline.config import TaskSpec
from pipeline.ranking import binary_entropy, grouped_auc_sums
from pipeline.training.metrics import MultiTaskMetrics

TASKS = [TaskSpec(name="click"), TaskSpec(name="like"), TaskSpec(name="watch", type="regression")]


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


def _worker(rank: int, rendezvous: str, queue: mp.Queue, cut: int = 1000) -> None:
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
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


def _on_two_workers(worker, cut: int, folder: Path) -> dict[int, dict[str, float]]:
    """Each rank's `compute()` from `worker(rank, rendezvous, queue, cut)` in two processes.

    The ranks meet through a file in `folder`, not a TCP port: a port found free and handed
    to rank 0 could be taken by any other process before rank 0 listened on it (seen once
    in CI: rank 0 failed with EADDRINUSE). A rank that dies fails the test at once."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    rendezvous = f"file://{folder / 'rendezvous'}"
    procs = [ctx.Process(target=worker, args=(r, rendezvous, queue, cut)) for r in range(2)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + 120
    try:
        while len(results) < len(procs):
            try:
                rank, value = queue.get(timeout=1)
                results[rank] = value
            except Empty:
                failed = {rank: p.exitcode for rank, p in enumerate(procs) if p.exitcode}
                if failed:
                    pytest.fail(f"a rank died (rank: exit code): {failed}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no result from ranks {set(range(2)) - set(results)} in 120 s")
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return results


@pytest.mark.parametrize("cut", [1000, 3000])  # 3000: the second worker's shard is empty
def test_metrics_are_exact_across_two_workers(cut: int, tmp_path: Path) -> None:
    results = _on_two_workers(_worker, cut, tmp_path)
    logits, labels, mask = _data(2)
    logits = logits.clone()
    logits[cut:] += 1.5
    want = _expected(logits, labels, mask)
    _check(results[0], want)
    assert results[0] == results[1]


# GAUC: click and like grouped by user (like on its own column), watch time has none.
GROUPED = [
    TaskSpec(name="click", group_column="user"),
    TaskSpec(name="like", group_column="viewer"),
    TaskSpec(name="watch", type="regression"),
]


def _grouped_data(seed: int, n: int = 3000) -> tuple[torch.Tensor, ...]:
    """`_data` with a third of the logits 0 (tied scores within users) and two group
    columns. Ties at 0 only: sigmoid(0) is 0.5 exactly, while a float32 sigmoid of other
    values may differ in the last bit with the value's position in its batch."""
    logits, labels, mask = _data(seed, n)
    g = torch.Generator().manual_seed(seed + 100)
    logits = torch.where(torch.rand(logits.shape, generator=g) < 0.3, 0.0, logits)
    users = torch.randint(0, 150, (n,), generator=g) * 7919 - 40_000  # negative keys too
    viewers = torch.randint(0, 40, (n,), generator=g)
    return logits, labels, mask, users, viewers


def _reference_gauc(users: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> float:
    """Per-user sklearn AUC weighted by the user's rows; single-class users left out."""
    total, weight = 0.0, 0.0
    for user in np.unique(users):
        rows = users == user
        if len(np.unique(labels[rows])) == 2:
            total += roc_auc_score(labels[rows], scores[rows]) * rows.sum()
            weight += rows.sum()
    return total / weight


def _chunks(cut: int, rank: int, n: int = 3000) -> list[slice]:
    """The batches of rows one worker scores: rows split by position, not by user."""
    start, stop = (0, cut) if rank == 0 else (cut, n)
    return [slice(s, min(s + 400, stop)) for s in range(start, stop, 400)]


def _expected_gauc(logits, labels, mask, users, viewers) -> dict[str, float]:
    out = {}
    for i, column in ((0, users), (1, viewers)):
        keep = mask[:, i].bool().numpy()
        p = torch.sigmoid(logits[:, i]).double().numpy()[keep]
        out[f"val/{GROUPED[i].name}/gauc"] = _reference_gauc(
            column.numpy()[keep], p, labels[:, i].numpy()[keep]
        )
    out["val/mean_gauc"] = (out["val/click/gauc"] + out["val/like/gauc"]) / 2
    return out


def test_grouped_auc_matches_per_user_sklearn_with_ties_and_one_class_users() -> None:
    logits, labels, mask, users, _ = _grouped_data(3)
    keys, scores, y = users.numpy(), torch.sigmoid(logits[:, 0]).double().numpy(), labels[:, 0]
    y = y.numpy().astype(np.float64)
    y[keys == keys[0]] = 1.0  # one user holding positives only: skipped, as in TorchRec
    weighted, weight, groups = grouped_auc_sums(keys, scores, y)
    assert weighted / weight == pytest.approx(_reference_gauc(keys, scores, y), abs=1e-12)
    with_both = sum(len(np.unique(y[keys == u])) == 2 for u in np.unique(keys))
    assert groups == with_both < len(np.unique(keys))
    assert grouped_auc_sums(keys[:0], scores[:0], y[:0]) == (0.0, 0.0, 0)


def test_gauc_is_the_per_user_auc_not_the_global_auc() -> None:
    # Within each user the order is right (GAUC 1); across users the scores are shifted so
    # that the global AUC is poor.
    keys = np.array([1, 1, 2, 2])
    scores, labels = np.array([0.8, 0.9, 0.1, 0.2]), np.array([0.0, 1.0, 0.0, 1.0])
    weighted, weight, _ = grouped_auc_sums(keys, scores, labels)
    assert weighted / weight == 1.0
    assert roc_auc_score(labels, scores) == 0.75


def _gauc_worker(rank: int, rendezvous: str, queue: mp.Queue, cut: int) -> None:
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    logits, labels, mask, users, viewers = _grouped_data(4)
    metrics = MultiTaskMetrics(GROUPED, torch.device("cpu"))
    for rows in _chunks(cut, rank):
        groups = {"user": users[rows], "viewer": viewers[rows]}
        metrics.update(logits[rows], labels[rows], mask[rows], groups)
    queue.put((rank, metrics.compute("val")))
    dist.destroy_process_group()


@pytest.mark.parametrize("cut", [1300, 3000])  # 3000: the second worker's shard is empty
def test_gauc_is_exact_across_two_workers(cut: int, tmp_path: Path) -> None:
    results = _on_two_workers(_gauc_worker, cut, tmp_path)
    want = _expected_gauc(*_grouped_data(4))
    for key, value in want.items():
        assert results[0][key] == pytest.approx(value, abs=1e-9), key
    assert results[0] == results[1]
    assert "val/watch/gauc" not in results[0]
    # Per-worker GAUCs would differ: each worker sees part of most users' rows.
    users = _grouped_data(4)[3][:1300].numpy()
    assert len(np.intersect1d(users, _grouped_data(4)[3][1300:].numpy())) > 100
