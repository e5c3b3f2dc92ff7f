"""A train worker's batches (`pipeline.data.feed`) on the session's Ray cluster: every row of
an epoch once, equal shares for DDP, read and preprocess fused, the shuffle, positions that
resume exactly, and the epoch cache. Two workers' feeds are driven from this process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from pipeline.config import DataConfig, load_config
from pipeline.data.feed import Budget, RowCache, WorkerFeed, _gather, choose_cache
from pipeline.data.fit import fit
from pipeline.data.ingest import READ_BLOCK_BYTES
from pipeline.data.plan import Range
from pipeline.data.split import split_mask, split_masks, split_names
from pipeline.data.validate import check_schema
from pipeline.datasets.synthetic import generate_logs

ROOT = Path(__file__).resolve().parents[3]
ROWS = 4_000
BATCH = 64
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def logs(ray_cluster, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("logs")
    generate_logs(out, ROWS, seed=5)
    cfg = load_config(ROOT / "configs" / "synthetic.yaml", [f"data.path={out}"]).data
    files = check_schema(cfg)
    preprocessor, counts = fit(cfg, files)
    return cfg, preprocessor, counts, pd.read_parquet(files.paths)


def _feeds(logs, cache: str = "off") -> list[WorkerFeed]:
    _, preprocessor, counts, _ = logs
    budget = Budget.of(2.0, 2, 0.5, READ_BLOCK_BYTES)
    cpu = torch.device("cpu")
    return [WorkerFeed(counts, preprocessor, r, 2, cpu, 0, budget, cache) for r in range(2)]


def _keys(batches) -> list[float]:
    """A row's identity: its ids, dense values and labels, summed (rows of the synthetic
    logs differ in them)."""
    keys = []
    for batch in batches:
        key = batch["categorical"].double().sum(1) * 1e3 + batch["dense"].double().sum(1)
        keys.extend((key + batch["labels"].double().sum(1) * 1e-3).tolist())
    return keys


def _expected(cfg: DataConfig, df: pd.DataFrame, name: str) -> int:
    return int(split_mask(df[cfg.split.column], cfg.split, name).sum())


def test_projection_leaves_out_oracle_and_passthrough(logs) -> None:
    columns = logs[0].columns(labels=True, split=True)
    assert "day" in columns and "click" in columns and "user_id" in columns
    assert not {"p_click", "e_watch_time", "event_id"} & set(columns)


def test_an_epoch_holds_every_row_once_in_equal_shares(logs) -> None:
    cfg, _, counts, df = logs
    assert counts.total("train") == _expected(cfg, df, "train")
    feeds = _feeds(logs)
    per_epoch = []
    for epoch in (1, 2):
        shares = [_keys(f.train(epoch, BATCH)) for f in feeds]
        assert len(shares[0]) == len(shares[1]) == feeds[0].rows("train")  # DDP's equal steps
        per_epoch.append(sorted(shares[0] + shares[1]))
        assert counts.total("train") - len(per_epoch[-1]) < 2  # at most world - 1 left out
    assert per_epoch[0] != per_epoch[1] or len(per_epoch[0]) == counts.total("train")
    validation = [_keys(f.evaluation("validation", 100)) for f in feeds]
    assert len(validation[0]) + len(validation[1]) == _expected(cfg, df, "validation")
    batch = next(feeds[0].train(1, BATCH))
    assert batch["categorical"].dtype == torch.int64 and batch["dense"].dtype == torch.float32
    assert batch["labels"].dtype == batch["mask"].dtype == torch.float32
    assert batch["weight"].shape == (BATCH,)
    assert ((batch["mask"] == 0) <= (batch["labels"] == 0)).all()  # missing -> 0


def test_read_and_preprocess_run_as_one_fused_task(logs) -> None:
    from ray.util.state import list_tasks

    for _ in _feeds(logs)[1].evaluation("test", 100):
        pass
    names = {t.name for t in list_tasks(limit=10_000)}
    assert "MapBatches(_read_unit)" in names, names  # one task reads and preprocesses


def test_the_shuffle_is_seeded_and_differs_by_epoch(logs) -> None:
    feed = _feeds(logs)[0]
    first, again, second = (_keys(feed.train(e, BATCH)) for e in (1, 1, 2))
    assert first == again  # the same seed, epoch and rank: the same order
    assert first != second
    plain = _keys(feed._unpacked(iter(_plain_batches(feed, 1))))
    assert sorted(first) == pytest.approx(sorted(plain)) and first != plain  # mixed rows


def _plain_batches(feed: WorkerFeed, epoch: int):
    """The worker's rows of the epoch in stream order, without the shuffle."""
    from pipeline.data.feed import _chunks, _torch

    for chunk in _chunks(feed._stream("train", epoch), BATCH):
        yield _torch(chunk, None, False)


@pytest.mark.parametrize("cache", ["off", "host"])
def test_a_worker_resumed_at_batch_k_reads_the_rest_of_the_epoch(logs, cache) -> None:
    """Batch k onwards, as a fresh worker resumed there reads them: the uninterrupted
    worker's batches from k, exactly, also when it reads an epoch of the cache (refilled
    from the first epoch's rows first)."""
    epoch = 1 if cache == "off" else 2
    whole = _feeds(logs, cache)[1]
    if cache == "host":
        list(whole.train(1, BATCH))  # the first epoch fills the cache
    reference = [dict(b) for b in whole.train(epoch, BATCH)]
    for start in (0, 3, 11, len(reference) - 1):
        resumed = _feeds(logs, cache)[1]
        batches = list(resumed.train(epoch, BATCH, start))
        assert len(batches) == len(reference) - start
        for got, want in zip(batches, reference[start:], strict=True):
            assert all(torch.equal(got[k], want[k]) for k in want)
        assert resumed.cache_hit() == (cache == "host")


def test_the_cache_serves_later_epochs_and_validation(logs) -> None:
    streamed, cached = _feeds(logs, "off")[0], _feeds(logs, "host")[0]
    assert not cached.cache_hit()
    first = _keys(cached.train(1, BATCH))  # the rows are cached before its first step
    # One pass filled every split's cache: validation and test read no Ray Data, even the
    # first time.
    assert all(cached.cache_hit(split) for split in ("train", "validation", "test"))
    plain = _keys(streamed.train(1, BATCH))
    assert sorted(first) == sorted(plain) and first != plain  # the same rows, all mixed
    second = _keys(cached.train(2, BATCH))
    assert sorted(second) == sorted(first) and second != first  # permuted on the device
    resumed = _feeds(logs, "host")[0]  # resumed inside epoch 1: the same cache, same order
    assert _keys(resumed.train(1, BATCH, 5)) == first[5 * BATCH :]
    assert _keys(resumed.train(2, BATCH)) == second
    assert _keys(cached.evaluation("validation", 100)) == _keys(
        streamed.evaluation("validation", 100)
    )
    alone = _feeds(logs, "host")[0]  # validation before any train pass fills only its own
    assert _keys(alone.evaluation("validation", 100)) == _keys(
        streamed.evaluation("validation", 100)
    )
    assert alone.cache_hit("validation") and "train" not in alone.cached
    assert _keys(cached.evaluation("test", 100)) == _keys(streamed.evaluation("test", 100))
    rows = sum(cached.rows(split) for split in ("train", "validation", "test"))
    assert sum(c.nbytes() for c in cached.cached.values()) == rows * cached.layout.row_bytes()


def test_the_test_split_is_kept_only_when_all_three_fit(logs) -> None:
    feed = _feeds(logs, "host")[0]
    row = feed.layout.row_bytes()
    rows = {split: feed.rows(split) for split in ("train", "validation", "test")}
    assert min(rows.values()) > 0
    everything = sum(rows.values()) * row
    assert feed.keep_what_fits("auto", 0, everything).where == "host"
    assert feed.keep == ("train", "validation", "test")
    without_test = everything - rows["test"] * row
    choice = feed.keep_what_fits("auto", 0, without_test)
    assert (choice.where, choice.bytes) == ("host", without_test)
    assert feed.keep == ("train", "validation")
    list(feed.train(1, BATCH))
    assert set(feed.cached) == {"train", "validation"}  # the test split streams at the end
    assert len(_keys(feed.evaluation("test", 100))) == rows["test"]
    assert "test" not in feed.cached
    assert feed.keep_what_fits("auto", 0, without_test - 1).where == "off"


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's smaps")
def test_a_host_cache_is_private_memory_in_place_before_its_first_write(logs) -> None:
    """Anonymous private pages, resident as soon as the cache exists (populated in one
    call, not faulted in one by one as the first pass writes them), written as any tensor."""
    layout = _feeds(logs)[0].layout
    cache = RowCache(layout, 100_000, torch.device("cpu"), pin=False)
    tensor = cache.tensors["float32"]
    mapping = _smaps_entry(tensor.data_ptr())
    size = tensor.numel() * 4
    assert int(mapping["Rss"].split()[0]) * 1024 >= size - 4096
    assert int(mapping["Anonymous"].split()[0]) * 1024 >= size - 4096
    assert "sh" not in mapping["VmFlags"].split()
    cache.put(20, {k: np.ones((10, t.shape[1]), t.numpy().dtype) for k, t in cache.tensors.items()})
    assert cache.filled == 10 and float(tensor[20:30].sum()) == tensor[20:30].numel()
    assert float(tensor[:20].abs().sum()) == 0


def _smaps_entry(address: int) -> dict[str, str]:
    """The fields of the /proc/self/smaps entry whose range holds `address`."""
    entry: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            if entry is not None:
                break
            entry = {} if lo <= address < hi else None
        elif entry is not None:
            key, _, value = line.partition(":")
            entry[key] = value.strip()
    assert entry is not None, f"no mapping holds {address:#x}"
    return entry


def test_the_cache_goes_where_it_fits() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert choose_cache("auto", 10, cpu, 0, 100).where == "host"
    assert choose_cache("auto", 10, gpu, 100, 100).where == "device"
    assert choose_cache("auto", 50, gpu, 10, 100).where == "host"  # pinned host memory
    assert choose_cache("auto", 500, gpu, 10, 100).where == "off"  # streams
    assert choose_cache("device", 500, gpu, 10, 1000).where == "off"  # over its budget
    assert choose_cache("off", 1, cpu, 100, 100).where == "off"
    budget = Budget.of(16.0, 2, 1.0, 16 * 2**20)
    assert (budget.cpus, budget.task_cpus) == (7.0, 0.5)
    assert np.isclose(budget.object_store_bytes / 2**20, 448)


def test_row_groups_shared_among_several_tasks_stream_as_one_task_reads_them(
    logs, monkeypatch
) -> None:
    """A pass whose row groups several tasks share, each a run of them (`Budget.tasks_for`:
    more tasks than run at once, fewer than row groups), streams the rows one task reading
    every row group gives, in the same order."""
    from pipeline.data import feed
    from pipeline.data.collate import FLOAT, Layout
    from pipeline.data.feed import stream_ranges, unit_items
    from pipeline.data.plan import EpochPlan

    asked, read_units = [], feed.read_units

    def counted(*args):
        asked.append(args[4])  # the tasks the pass is read in
        return read_units(*args)

    monkeypatch.setattr(feed, "read_units", counted)

    _, preprocessor, counts, _ = logs
    layout = Layout.of(preprocessor.empty())
    parts = [("train", EpochPlan.of(counts, "train", 1, 0, 1, True).ranges(0))]
    items, nbytes = len(unit_items(parts)), counts.total("train") * layout.row_bytes()
    one = Budget.of(2.0, 2, 0.5, READ_BLOCK_BYTES)
    several = Budget.of(2.0, 1, 0.5, nbytes // 10 + 1)  # 3 at once, a share of just over a fifth
    assert one.tasks_for(items, nbytes) == 1
    assert several.tasks == 3 and several.tasks_for(items, nbytes) == 5 < items

    def streamed(budget: Budget) -> dict[str, np.ndarray]:
        blocks = list(stream_ranges(parts, preprocessor, layout, budget))
        return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}

    got, want = streamed(several), streamed(one)
    assert asked == [5, 1]
    assert len(want[FLOAT]) == counts.total("train")
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_a_searchs_preprocessed_copy_serves_the_same_rows(logs, tmp_path) -> None:
    """`materialise` writes every split preprocessed and packed once; a feed over the copy
    reads no raw log and serves the same rows of every split (in the copy's own order)."""
    from pipeline.data.materialise import materialise

    cfg, preprocessor, counts, _ = logs
    copy = materialise(preprocessor, counts, str(tmp_path / "copy"), 0.5)
    assert copy.packed and all(path.startswith(str(tmp_path)) for path, _ in copy.units)
    assert {s: copy.total(s) for s in copy.rows} == {s: counts.total(s) for s in counts.rows}
    again = materialise(preprocessor, counts, str(tmp_path / "copy"), 0.5)
    assert again == copy  # complete (its marker): reused as it is
    budget = Budget.of(2.0, 1, 0.5, READ_BLOCK_BYTES)
    cpu = torch.device("cpu")  # one worker: every row of the epoch, none left out
    raw, packed = (WorkerFeed(c, preprocessor, 0, 1, cpu, 0, budget) for c in (counts, copy))
    assert sorted(_keys(packed.train(1, BATCH))) == pytest.approx(
        sorted(_keys(raw.train(1, BATCH)))
    )
    for split in ("validation", "test"):
        got, want = (sorted(_keys(f.evaluation(split, 100))) for f in (packed, raw))
        assert len(got) == counts.total(split) and got == pytest.approx(want)


def test_picks_of_a_batch_are_preprocessed_together_as_each_alone(tmp_path) -> None:
    """`_transformed` preprocesses several picks of a batch's rows in one call and gives
    each pick the rows preprocessing it alone gives, in its order: picks one after the
    other (a slice of the batch), interleaved (rows of several splits), and absent."""
    import pyarrow.parquet as pq

    from pipeline.data import feed
    from pipeline.data.collate import Layout

    generate_logs(tmp_path / "logs", 3_000, seed=3)
    cfg = load_config(ROOT / "configs" / "synthetic.yaml", [f"data.path={tmp_path / 'logs'}"]).data
    preprocessor, counts = fit(cfg, check_schema(cfg))
    layout = Layout.of(preprocessor.empty())
    path, group = counts.units[0]
    batch = pq.ParquetFile(path).read_row_group(group).to_batches()[0]
    cases = [
        [np.arange(0, 50), np.arange(50, 80)],  # one after the other
        [np.arange(1, 60, 2), None, np.arange(0, 60, 2)],  # interleaved, one absent
        [None, np.array([7, 9, 30])],
    ]
    for picks in cases:
        together = feed._transformed(batch, picks, preprocessor, layout)
        for pick, got in zip(picks, together, strict=True):
            if pick is None:
                assert got is None
                continue
            want = layout.pack(preprocessor.transform(batch.take(pa.array(pick))))
            for key in ("float32", "int64"):
                np.testing.assert_array_equal(np.asarray(got[key]), want[key].numpy())


def test_a_row_group_read_for_two_splits_in_a_row_is_decoded_once(tmp_path, monkeypatch) -> None:
    """A task whose ranges of two splits lie in one row group (logs split by a hash, as the
    Census files are by a column's values) decodes it once, hashes its split column and
    preprocesses its rows once per batch for both splits, and yields what reading it for
    each range apart yields."""
    from pipeline.data import feed
    from pipeline.data.collate import Layout

    generate_logs(tmp_path / "logs", 3_000, seed=1)
    cfg = load_config(
        ROOT / "configs" / "synthetic.yaml",
        [f"data.path={tmp_path / 'logs'}", "data.split.method=hash", "data.split.column=user_id"],
    ).data
    preprocessor, counts = fit(cfg, check_schema(cfg))
    layout = Layout.of(preprocessor.empty())
    path, group = counts.units[0]
    train, validation = counts.rows["train"][0], counts.rows["validation"][0]
    assert train and validation  # the row group holds rows of both splits
    items = [("train", 0, train - 7), ("validation", 3, validation), ("train", train - 7, train)]
    reads = []
    open_row_group = feed._open_row_group
    monkeypatch.setattr(
        feed, "_open_row_group", lambda *args: reads.append(args[:2]) or open_row_group(*args)
    )

    def read(chosen) -> list[dict[str, np.ndarray]]:
        parts = [(s, [Range(path, group, a, b, counts.rows[s][0])]) for s, a, b in chosen]
        tables = feed._read_unit(_as_batch(feed.unit_items(parts)), preprocessor, layout)
        return [{k: feed._tensor(t.column(k)) for k in t.column_names} for t in tables]

    masked = []
    split_masks = feed.split_masks
    monkeypatch.setattr(
        feed, "split_masks", lambda *args: masked.append(args[2]) or split_masks(*args)
    )
    transformed = []
    transform = type(preprocessor).transform
    monkeypatch.setattr(
        type(preprocessor),
        "transform",
        lambda self, table: transformed.append(table.num_rows) or transform(self, table),
    )
    together = read(items)
    assert reads == [(path, group)]  # three ranges in a row of one row group: one decode
    assert masked == [["train", "validation"]]  # one batch: one pass over its split column
    assert transformed == [train + validation - 3]  # and one preprocessing call
    reads.clear()
    apart = [block for item in items for block in read([item])]
    assert len(reads) == 3 and len(transformed) == 4
    for key in ("float32", "int64"):
        np.testing.assert_array_equal(
            np.concatenate([b[key] for b in together]), np.concatenate([b[key] for b in apart])
        )
    assert sum(len(b["float32"]) for b in together) == train + validation - 3


def _as_batch(items: list[dict]) -> dict[str, np.ndarray]:
    """Ray Data's numpy batch of `unit_items`' items (a list per range field)."""
    batch = {key: np.empty(len(items), dtype=object) for key in items[0]}
    for n, item in enumerate(items):
        for key, value in item.items():
            batch[key][n] = value
    return batch


def test_the_cache_pass_decodes_a_row_group_once_for_all_its_splits(
    ray_cluster, tmp_path, monkeypatch
) -> None:
    """Logs split by a hash hold rows of every split in every row group: the pass that
    fills the caches reads a worker's ranges of one row group in a row, one decode for
    them all, and puts each range's rows at their place: each split's cache holds its rows
    in the order the split streams them."""
    from pipeline.data import feed

    generate_logs(tmp_path / "logs", 3_000, seed=2)
    overrides = [f"data.path={tmp_path / 'logs'}", "data.split.method=hash",
                 "data.split.column=user_id", "data.split.test_fraction=0.1"]  # fmt: skip
    cfg = load_config(ROOT / "configs" / "synthetic.yaml", overrides).data
    preprocessor, counts = fit(cfg, check_schema(cfg))
    budget = Budget.of(2.0, 2, 0.5, READ_BLOCK_BYTES)
    splits = ["train", "validation", "test"]
    reads: list[tuple] = []
    open_row_group = feed._open_row_group
    monkeypatch.setattr(
        feed, "_open_row_group", lambda *args: reads.append(args[:2]) or open_row_group(*args)
    )
    for rank in range(2):
        worker = WorkerFeed(counts, preprocessor, rank, 2, torch.device("cpu"), 0, budget, "host")
        list(worker.train(1, BATCH))
        for split in splits:
            streamed = list(worker._stream(split, 1 if split == "train" else 0))
            for key, tensor in worker.cached[split].tensors.items():
                want = np.concatenate([block[key] for block in streamed])
                np.testing.assert_array_equal(tensor.numpy(), want)
        # The same pass in this process: one decode per row group, though most hold
        # ranges of two or three splits.
        parts = [(split, worker._ranges(split, 1)) for split in splits]
        placed = feed.by_row_group(parts)
        units = {(r.path, r.row_group) for _, r, _ in placed}
        assert len(placed) >= 2 * len(units)
        reads.clear()
        items = feed.unit_items([(split, [r]) for split, r, _ in placed])
        rows = sum(
            t.num_rows for t in feed._read_unit(_as_batch(items), preprocessor, worker.layout)
        )
        assert sorted(reads) == sorted(units) and rows == sum(r.rows for _, r, _ in placed)


def test_a_row_group_of_one_split_is_read_without_its_mask(tmp_path, monkeypatch) -> None:
    """Logs split by day hold one split per row group: its rows are taken as read, without
    computing the split's mask or reading the split column, and they are the rows the mask
    would keep."""
    import pyarrow.parquet as pq

    from pipeline.data import feed
    from pipeline.data.collate import Layout
    from pipeline.data.split import split_mask

    generate_logs(tmp_path / "logs", 3_000, seed=1)
    cfg = load_config(ROOT / "configs" / "synthetic.yaml", [f"data.path={tmp_path / 'logs'}"]).data
    preprocessor, counts = fit(cfg, check_schema(cfg))
    layout = Layout.of(preprocessor.empty())
    masks, read = [], []
    split_masks = feed.split_masks
    monkeypatch.setattr(
        feed, "split_masks", lambda *args: masks.append(args[2]) or split_masks(*args)
    )
    batches = feed._RowGroup.batches
    monkeypatch.setattr(
        feed._RowGroup, "batches", lambda self, cols: read.append(cols) or batches(self, cols)
    )
    for split in ("train", "test"):
        unit = next(i for i, n in enumerate(counts.rows[split]) if n)
        (path, group), rows = counts.units[unit], counts.rows[split][unit]
        table = pq.ParquetFile(path).read_row_group(group)
        assert rows == table.num_rows  # a day of one split
        assert split_mask(table.column("day"), cfg.split, split).all()
        items = feed.unit_items([(split, [Range(path, group, 5, rows - 2, rows)])])
        tables = list(feed._read_unit(_as_batch(items), preprocessor, layout))
        want = layout.pack(preprocessor.transform(table.slice(5, rows - 7)))
        for key in ("float32", "int64"):
            got = np.concatenate([feed._tensor(t.column(key)) for t in tables])
            np.testing.assert_array_equal(got, want[key])
    assert masks == []
    assert read == [cfg.columns(labels=True)] * 2 and "day" not in read[0]


def test_a_row_group_with_rows_of_no_split_reads_the_split_column(tmp_path, monkeypatch) -> None:
    """A day whose rows are not all of one split (here: rows with no day, of no split)
    reads the split column, as its dictionary, and keeps the rows its mask keeps."""
    import pyarrow.parquet as pq

    from pipeline.data import feed
    from pipeline.data.collate import Layout

    generate_logs(tmp_path / "logs", 3_000, seed=1)
    path = sorted((tmp_path / "logs").glob("*.parquet"))[0]
    table = pq.read_table(path)
    day = table.column("day").to_pylist()
    day[3:6] = [None] * 3
    table = table.set_column(table.schema.get_field_index("day"), "day", pa.array(day))
    pq.write_table(table, path)
    cfg = load_config(ROOT / "configs" / "synthetic.yaml", [f"data.path={tmp_path / 'logs'}"]).data
    preprocessor, counts = fit(cfg, check_schema(cfg))
    layout = Layout.of(preprocessor.empty())
    unit = counts.units.index((str(path), 0))
    assert counts.rows["train"][unit] == table.num_rows - 3
    read = []
    batches = feed._RowGroup.batches
    monkeypatch.setattr(
        feed._RowGroup, "batches", lambda self, cols: read.append(cols) or batches(self, cols)
    )
    unit_read = feed._open_row_group(str(path), 0, feed.dictionary_candidates(cfg))
    days = next(unit_read.batches(["day"])).column("day")
    assert pa.types.is_dictionary(days.type) and days.null_count == 3
    read.clear()
    items = feed.unit_items([("train", [Range(str(path), 0, 0, table.num_rows - 3,
                                              table.num_rows - 3)])])  # fmt: skip
    tables = list(feed._read_unit(_as_batch(items), preprocessor, layout))
    assert read == [cfg.columns(labels=True, split=True)]
    keep = table.filter(pa.array([d is not None for d in day]))
    want = layout.pack(preprocessor.transform(keep))
    for key in ("float32", "int64"):
        got = np.concatenate([feed._tensor(t.column(key)) for t in tables])
        np.testing.assert_array_equal(got, want[key])


def test_small_string_dictionaries_are_read_as_such_and_preprocess_to_the_same_rows(
    tmp_path,
) -> None:
    """A hashed string column with a small dictionary, and the split column, are read as
    their dictionary; one whose writer fell back to plain pages (a dictionary over the
    writer's limit) and an int column are read as they are. The packed rows, and the split
    masks, are those of the plain read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data import feed
    from pipeline.data.collate import Layout

    generate_logs(tmp_path / "logs", 3_000, seed=1)
    cfg = load_config(ROOT / "configs" / "synthetic.yaml", [f"data.path={tmp_path / 'logs'}"]).data
    preprocessor, counts = fit(cfg, check_schema(cfg))
    layout = Layout.of(preprocessor.empty())
    path, group = counts.units[0]
    metadata = pq.read_metadata(path)
    candidates = feed.dictionary_candidates(cfg)
    assert {"device", "user_id", "item_id", "day"} <= set(candidates)
    # `device` and the split column `day` are text of a few values, the ids are ints.
    assert feed.dictionary_columns(metadata, [group], candidates) == ["device", "day"]
    unit = feed._open_row_group(path, group, candidates)
    batches = unit.batches(cfg.columns(labels=True, split=True))
    batch = next(batches)
    assert pa.types.is_dictionary(batch.schema.field("device").type)
    assert pa.types.is_dictionary(batch.schema.field("day").type)
    table = pq.ParquetFile(path).read_row_group(group)
    assert not pa.types.is_dictionary(table.schema.field("device").type)
    want = layout.pack(preprocessor.transform(table))
    read = pa.Table.from_batches([batch, *batches])
    got = layout.pack(preprocessor.transform(read))
    for key in ("float32", "int64"):
        np.testing.assert_array_equal(got[key], want[key])
    names = split_names(cfg.split)
    plain = split_masks(table.column("day"), cfg.split, names)
    for name, mask in split_masks(read.column("day"), cfg.split, names).items():
        np.testing.assert_array_equal(mask, plain[name])

    # Many distinct strings, with a dictionary limit the writer outgrows: plain pages after it.
    ids = pa.array([f"user-{i}" for i in range(20_000)])
    pq.write_table(pa.table({"u": ids}), tmp_path / "wide.parquet", dictionary_pagesize_limit=4096)
    wide = pq.read_metadata(tmp_path / "wide.parquet")
    assert wide.row_group(0).column(0).has_dictionary_page
    assert feed.dictionary_columns(wide, [0], ["u"]) == []


def test_a_host_gather_takes_the_rows_in_order_into_memory_of_its_own() -> None:
    cache = {"float32": torch.randn(1000, 13), "int64": torch.randint(0, 10**6, (1000, 7))}
    rows = torch.randperm(1000)[:300]
    batch = _gather(cache, rows)
    for key, tensor in cache.items():
        assert batch[key].dtype == tensor.dtype
        assert torch.equal(batch[key], tensor.index_select(0, rows))
    batch["float32"][0] = 7.0  # the batch's own memory: the cache is untouched
    assert not torch.any(cache["float32"] == 7.0)
