"""Epoch plans (`pipeline.data.plan`): which rows each worker reads, decided before a row is
read. Properties over random row-group sizes, world sizes and positions."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.plan import EpochPlan, SplitRows, epoch_order


def _stream_rows(plan: EpochPlan, rank: int, skip: int = 0) -> list[tuple[str, int]]:
    """(file, row) of every row worker `rank` reads, in order."""
    return [(r.path, i) for r in plan.ranges(rank, skip) for i in range(r.start, r.stop)]


sizes = st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(sizes=sizes, world=st.integers(1, 5), seed=st.integers(0, 9), epoch=st.integers(1, 4))
def test_train_ranges_are_equal_disjoint_and_cover_all_but_fewer_than_world(
    sizes, world, seed, epoch
) -> None:
    counts = SplitRows([(f"f{i}", 0) for i in range(len(sizes))], {"train": sizes})
    plan = EpochPlan.of(counts, "train", world, seed, epoch, shuffle=True)
    rows = [_stream_rows(plan, r) for r in range(world)]
    assert len({len(r) for r in rows}) == 1  # every worker the same number of rows
    everything = [row for worker in rows for row in worker]
    assert len(everything) == len(set(everything))  # no row twice
    assert sum(sizes) - len(everything) < world  # fewer than `world` rows left out
    for worker in rows:  # a file's rows in the file's own order
        by_file: dict[str, list[int]] = {}
        for path, i in worker:
            by_file.setdefault(path, []).append(i)
        assert all(v == sorted(v) for v in by_file.values())


@settings(max_examples=200, deadline=None)
@given(sizes=sizes, world=st.integers(1, 5))
def test_evaluation_ranges_hold_every_row_exactly_once_in_even_shares(sizes, world) -> None:
    counts = SplitRows([(f"f{i}", 0) for i in range(len(sizes))], {"validation": sizes})
    plan = EpochPlan.of(counts, "validation", world, seed=0, epoch=0, shuffle=False)
    shares = [_stream_rows(plan, r) for r in range(world)]
    everything = sorted(row for share in shares for row in share)
    expected = sorted((f"f{i}", j) for i, size in enumerate(sizes) for j in range(size))
    assert everything == expected  # every row once
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # even: one file split too
    units = [{path for path, _ in share} for share in shares]
    assert sum(len(u) for u in units) - len(set().union(*units)) < world  # few read twice
    for rank in range(world):  # a resumed pass reads the rest of the share
        skip = len(shares[rank]) // 2
        assert _stream_rows(plan, rank, skip) == shares[rank][skip:]


@settings(max_examples=200, deadline=None)
@given(sizes=sizes, world=st.integers(1, 4), data=st.data())
def test_a_resumed_worker_reads_the_rest_of_its_range(sizes, world, data) -> None:
    counts = SplitRows([(f"f{i}", 0) for i in range(len(sizes))], {"train": sizes})
    plan = EpochPlan.of(counts, "train", world, seed=3, epoch=2, shuffle=True)
    rank = data.draw(st.integers(0, world - 1))
    whole = _stream_rows(plan, rank)
    skip = data.draw(st.integers(0, len(whole)))
    assert _stream_rows(plan, rank, skip) == whole[skip:]
    ranges = plan.ranges(rank, skip)
    assert all(r.unit_rows == sizes[int(r.path[1:])] for r in ranges)


def test_the_unit_order_is_fixed_by_seed_and_epoch() -> None:
    assert epoch_order(10, 0, 1) == epoch_order(10, 0, 1)
    orders = {tuple(epoch_order(10, seed, epoch)) for seed in range(3) for epoch in range(1, 4)}
    assert len(orders) == 9
    counts = SplitRows(
        [("a", 0), ("b", 0), ("b", 1)], {"train": [1, 2, 3], "validation": [0, 5, 0]}
    )
    assert EpochPlan.of(counts, "validation", 2, 0, 0, shuffle=False).units == [(("b", 0), 5)]
    assert SplitRows.from_dict(counts.to_dict()) == counts
    assert counts.total("train") == 6 and counts.total("test") == 0
