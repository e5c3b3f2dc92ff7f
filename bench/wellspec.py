"""A well-specified reference learner for the synthetic logs: how close to the oracle AUC a
model can get from this many rows when it has exactly the generator's form.

The generator (`pipeline/datasets/synthetic.py`) draws each binary task's logit as a bias, a
low-rank user-item interest (click's interest; like and share mix it with a second one),
per-user and per-item effects, device and hour effects and a few dense terms. This model
has that form and nothing else: rank-8 user and item factors (each the user's segment /
the item's category centroid plus the id's own vector), a per-task weight on their
elementwise product (which can express both interests and their mix), per-task user,
item, device and hour biases, and a per-task linear term over position, log1p item age,
log tenure and log video length. It trains on the same train split (Adam, binary
cross-entropy; like and share only where clicked), picks the epoch by summed validation AUC and
reports test AUC. The oracle knows every id's true factors; this learner, like any model,
must estimate them from that id's rows, so its gap to the oracle is the part of a model's
gap that comes from data per id, not from the architecture or the pipeline.

    python -m bench.wellspec data/logs [--epochs 15] [--lr 0.01] [--batch 2048]
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from pipeline.config import load_config
from pipeline.data.split import split_mask

REPO = Path(__file__).resolve().parent.parent
TASKS = ("click", "like", "share")
ORACLE = {"click": "p_click", "like": "p_like", "share": "p_share"}
RANK = 8
DENSE = 4


@dataclass
class Split:
    """One split's model inputs, labels (-1 where unobserved) and oracle probabilities."""

    ids: torch.Tensor  # [rows, 6]: user, item, segment, category, device, hour
    dense: torch.Tensor  # [rows, 4]
    labels: torch.Tensor  # [rows, 3]
    oracle: np.ndarray  # [rows, 3]


@dataclass
class WellSpecResult:
    """Test AUC of the reference learner and of the oracle, per binary task."""

    test: dict[str, float]
    oracle: dict[str, float]
    best_epoch: int

    @property
    def gaps(self) -> dict[str, float]:
        return {t: self.oracle[t] - self.test[t] for t in self.test}


def load_splits(logs: Path) -> tuple[dict[str, Split], list[int]]:
    """Read the logs and split them as `configs/synthetic.yaml` does (by day)."""
    config = load_config(REPO / "configs" / "synthetic.yaml", [f"data.path={logs}"])
    table = ds.dataset(str(logs), format="parquet").to_table()
    device = pc.dictionary_encode(table["device"]).combine_chunks()
    columns = {
        "user": table["user_id"],
        "item": table["item_id"],
        "segment": table["user_segment"],
        "category": table["item_category"],
        "device": device.indices,
        "hour": table["hour"],
    }
    ids = np.stack([c.to_numpy().astype(np.int64) for c in columns.values()], axis=1)
    sizes = [int(ids[:, j].max()) + 1 for j in range(ids.shape[1])]
    dense = np.stack(
        [
            (table["position"].to_numpy().astype(np.float32) - 10) / 6,
            np.log1p(table["item_age_hours"].to_numpy()) - 3,
            np.log(table["user_tenure_days"].to_numpy()) - 4,
            np.log(table["video_length_min"].to_numpy()) - 1,
        ],
        axis=1,
    ).astype(np.float32)
    labels = np.stack(
        [table[t].to_numpy(zero_copy_only=False).astype(np.float32) for t in TASKS], axis=1
    )
    labels = np.nan_to_num(labels, nan=-1.0)
    oracle = np.stack([table[ORACLE[t]].to_numpy() for t in TASKS], axis=1)
    out = {}
    for name in ("train", "validation", "test"):
        mask = split_mask(table[config.data.split.column], config.data.split, name)
        out[name] = Split(
            torch.from_numpy(ids[mask]),
            torch.from_numpy(dense[mask]),
            torch.from_numpy(labels[mask]),
            oracle[mask],
        )
    return out, sizes


class WellSpec(nn.Module):
    """The generator's functional form with free parameters (see the module docstring)."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        users, items, segments, categories, devices, hours = sizes
        tasks = len(TASKS)
        self.user = nn.Embedding(users, RANK)
        self.item = nn.Embedding(items, RANK)
        self.segment = nn.Embedding(segments, RANK)
        self.category = nn.Embedding(categories, RANK)
        for table in (self.user, self.item, self.segment, self.category):
            nn.init.normal_(table.weight, std=0.1)
        self.biases = nn.ModuleList(nn.Embedding(n, tasks) for n in sizes[:2] + sizes[4:])
        for table in self.biases:
            nn.init.zeros_(table.weight)
        self.product = nn.Linear(RANK, tasks)
        self.dense = nn.Linear(DENSE, tasks, bias=False)

    def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        user = self.user(ids[:, 0]) + self.segment(ids[:, 2])
        item = self.item(ids[:, 1]) + self.category(ids[:, 3])
        logits = self.product(user * item) + self.dense(dense)
        for table, column in zip(self.biases, (0, 1, 4, 5), strict=True):
            logits = logits + table(ids[:, column])
        return logits


def _masked_aucs(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUC per task over the rows where its label is observed (>= 0)."""
    out = {}
    for j, task in enumerate(TASKS):
        seen = labels[:, j] >= 0
        out[task] = float(roc_auc_score(labels[seen, j], scores[seen, j]))
    return out


def _aucs(model: WellSpec, split: Split) -> dict[str, float]:
    with torch.no_grad():
        scores = torch.cat(
            [
                model(split.ids[i : i + 65536], split.dense[i : i + 65536])
                for i in range(0, len(split.ids), 65536)
            ]
        ).numpy()
    return _masked_aucs(split.labels.numpy(), scores)


def oracle_aucs(split: Split) -> dict[str, float]:
    """The true probabilities' AUC per task on this split."""
    return _masked_aucs(split.labels.numpy(), split.oracle)


def wellspec_auc(
    logs: Path, epochs: int = 15, lr: float = 0.01, batch: int = 2048, seed: int = 0
) -> WellSpecResult:
    """Train the reference learner on `logs` and return its test AUC beside the oracle's."""
    torch.manual_seed(seed)
    splits, sizes = load_splits(logs)
    train = splits["train"]
    model = WellSpec(sizes)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    best, best_sum, best_epoch = None, -np.inf, 0
    for epoch in range(1, epochs + 1):
        model.train()
        for index in torch.randperm(len(train.ids), generator=generator).split(batch):
            labels = train.labels[index]
            logits = model(train.ids[index], train.dense[index])
            seen = labels >= 0
            loss = nn.functional.binary_cross_entropy_with_logits(
                logits[seen], labels[seen], reduction="sum"
            ) / len(index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        total = sum(_aucs(model, splits["validation"]).values())
        if total > best_sum:
            best, best_sum, best_epoch = copy.deepcopy(model.state_dict()), total, epoch
    model.load_state_dict(best)
    return WellSpecResult(_aucs(model, splits["test"]), oracle_aucs(splits["test"]), best_epoch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logs", type=Path, help="synthetic logs folder (adatt generate)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = wellspec_auc(args.logs, args.epochs, args.lr, args.batch, args.seed)
    print(f"{'':<10}" + "".join(f"{t:>10}" for t in TASKS))
    for name, values in (("oracle", result.oracle), ("wellspec", result.test)):
        print(f"{name:<10}" + "".join(f"{values[t]:>10.4f}" for t in TASKS))
    print(f"best epoch {result.best_epoch}")
    print(f"wellspec_worst_gap_to_oracle={max(result.gaps.values()):.4f}")


if __name__ == "__main__":
    main()
