"""Which rows each worker reads in each epoch, decided before any row is read: pure
arithmetic over the rows each Parquet row group holds of each split (counted by the
driver's row pass).

The unit of reading is a row group (`Unit`: a file and a row group in it). An epoch of a
split is its units in an order fixed by (seed, epoch) (shuffled for the train split, as
given for evaluation), read one after the other: one stream of rows. Worker r of n reads:

- train: rows [r R, (r + 1) R) of that stream, with R = total // n, so every worker takes
  the same number of steps (DDP needs it) and at most n - 1 rows are left out of an epoch.
  A range starts and ends inside units: the worker reads those row groups and keeps its
  rows (so at most n - 1 row groups of an epoch are read twice);
- evaluation: rows [r T // n, (r + 1) T // n) of the stream of all T rows: every row
  exactly once, shares that differ by at most one row (the slowest worker ends an
  evaluation pass, so a split of one file is read by all workers, not by one), and again
  at most n - 1 row groups read by two workers.

Since the plan is a function of (seed, epoch, rank, world size) and the counts, a position
in an epoch is one number (rows of the worker's share taken), and a resumed worker reads
from there: the row groups before it are not read again, and of the row group it stands in
only that row group is read again, none of its rows trained twice.

Example:
    >>> counts = SplitRows([("a", 0), ("b", 0), ("c", 0)], {"train": [5, 3, 4]})
    >>> plan = EpochPlan.of(counts, "train", world=2, seed=0, epoch=1, shuffle=False)
    >>> plan.rows_per_worker
    6
    >>> [(r.path, r.start, r.stop) for r in plan.ranges(0)]
    [('a', 0, 5), ('b', 0, 1)]
    >>> [(r.path, r.start, r.stop) for r in plan.ranges(1)]
    [('b', 1, 3), ('c', 0, 4)]
    >>> [(r.path, r.start, r.stop) for r in plan.ranges(1, skip=3)]  # 3 rows taken already
    [('c', 1, 4)]
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

Unit = tuple[str, int]  # (file, row group)


@dataclass(frozen=True)
class SplitRows:
    """How many rows of each split each row group holds.

    Attributes:
        units: (file, row group) of every row group of the run's files, in the order given.
        rows: split name -> rows per unit, aligned with `units`.
        packed: the files hold rows already preprocessed and packed (a search's shared copy,
            `pipeline.data.materialise`), not raw logs.
    """

    units: list[Unit]
    rows: dict[str, list[int]] = field(default_factory=dict)
    packed: bool = False

    def total(self, split: str) -> int:
        """Rows of `split` in all the files."""
        return sum(self.rows.get(split, []))

    def to_dict(self) -> dict:
        """JSON-serialisable (for the workers' loop config)."""
        rows = {k: list(v) for k, v in self.rows.items()}
        units = [[path, group] for path, group in self.units]
        return {"units": units, "rows": rows, "packed": self.packed}

    @classmethod
    def from_dict(cls, payload: dict) -> SplitRows:
        units = [(str(path), int(group)) for path, group in payload["units"]]
        rows = {k: list(v) for k, v in payload["rows"].items()}
        return cls(units, rows, bool(payload.get("packed", False)))


@dataclass(frozen=True)
class Range:
    """Rows [start, stop) of a row group's `unit_rows` rows of the split (in its order)."""

    path: str
    row_group: int
    start: int
    stop: int
    unit_rows: int
    packed: bool = False  # of a search's preprocessed copy (`SplitRows.packed`)

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def as_packed(self) -> Range:
        return Range(self.path, self.row_group, self.start, self.stop, self.unit_rows, True)


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The units' order in an epoch: a permutation fixed by (seed, epoch).

    Example:
        >>> epoch_order(4, 0, 1) == epoch_order(4, 0, 1) != epoch_order(4, 0, 2)
        True
    """
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


@dataclass(frozen=True)
class EpochPlan:
    """One epoch of one split: its units in order with their rows, and the world size.

    Attributes:
        units: (unit, rows of the split) in the epoch's order; units without rows of the
            split are left out.
        world: the number of workers.
        equal: every worker takes the same number of rows (train).
    """

    units: list[tuple[Unit, int]]
    world: int
    equal: bool

    @classmethod
    def of(
        cls, counts: SplitRows, split: str, world: int, seed: int, epoch: int, shuffle: bool
    ) -> EpochPlan:
        """The plan of `split` in `epoch` (shuffled unit order for `shuffle`)."""
        rows = counts.rows.get(split, [0] * len(counts.units))
        order = epoch_order(len(rows), seed, epoch) if shuffle else range(len(rows))
        units = [(counts.units[i], rows[i]) for i in order if rows[i]]
        return cls(units, world, equal=split == "train")

    @property
    def total(self) -> int:
        """The split's rows in all the units."""
        return sum(rows for _, rows in self.units)

    @property
    def rows_per_worker(self) -> int:
        """Train: the rows every worker takes (the same for all)."""
        return self.total // self.world

    def worker_rows(self, rank: int) -> int:
        """How many rows worker `rank` takes."""
        return sum(r.rows for r in self.ranges(rank))

    def share(self, rank: int) -> tuple[int, int]:
        """Worker `rank`'s rows [first, last) of the epoch's stream."""
        if self.equal:
            size = self.rows_per_worker
            return rank * size, (rank + 1) * size
        return rank * self.total // self.world, (rank + 1) * self.total // self.world

    def ranges(self, rank: int, skip: int = 0) -> list[Range]:
        """The ranges worker `rank` reads, in order, after `skip` rows of its share."""
        first, last = self.share(rank)
        first = min(first + skip, last)
        out, offset = [], 0
        for (path, group), rows in self.units:
            start, stop = max(first - offset, 0), min(last - offset, rows)
            if start < stop:
                out.append(Range(path, group, start, stop, rows))
            offset += rows
            if offset >= last:
                break
        return out
