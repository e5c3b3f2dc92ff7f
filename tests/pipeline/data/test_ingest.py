"""Ray Data ingest end to end on a local 2-CPU Ray: datasets, torch batches, Ray Train."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import DataConfig, load_config
from pipeline.data.files import InputFiles
from pipeline.data.fit import fit_preprocessor
from pipeline.data.ingest import batch_layout, build_datasets, configure_ray_data, iter_batches
from pipeline.data.split import split_mask
from pipeline.data.validate import check_schema
from pipeline.datasets.synthetic import generate_logs

ROOT = Path(__file__).resolve().parents[3]
ROWS = 4_000
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def by_value(ray_cluster):
    """The session's local Ray (2 CPUs). Workers get this module's train loop by value:
    the test module is not importable by name in a worker."""
    import sys

    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> tuple[DataConfig, InputFiles, pd.DataFrame]:
    out = tmp_path_factory.mktemp("logs")
    generate_logs(out, ROWS, seed=5)
    cfg = load_config(ROOT / "configs" / "synthetic.yaml", [f"data.path={out}"]).data
    files = check_schema(cfg)
    return cfg, files, pd.read_parquet(files.paths)


def _expected(cfg: DataConfig, df: pd.DataFrame, name: str) -> tuple[int, np.ndarray]:
    part = df[split_mask(df[cfg.split.column], cfg.split, name)]
    labels = np.stack([part[t.label_column].fillna(0).to_numpy() for t in cfg.tasks], 1)
    return len(part), labels.sum(axis=0)


def test_projection_leaves_out_oracle_and_passthrough(logs) -> None:
    cfg, _, _ = logs
    columns = cfg.columns(labels=True, split=True)
    assert "day" in columns and "click" in columns and "user_id" in columns
    assert not {"p_click", "e_watch_time", "event_id"} & set(columns)


def test_datasets_stream_typed_batches(by_value, logs) -> None:
    cfg, files, df = logs
    preprocessor = fit_preprocessor(cfg, files)
    datasets = build_datasets(cfg, preprocessor, files)
    assert sorted(datasets) == ["test", "train", "validation"]
    layout = batch_layout(preprocessor)
    for name, ds in datasets.items():
        rows, label_sums = 0, 0.0
        batches = iter_batches(ds, layout, 256, "cpu", shuffle=name == "train", seed=0)
        for batch in batches:
            assert batch["categorical"].dtype == torch.int64
            assert batch["categorical"].shape[1] == len(cfg.categorical)
            assert batch["dense"].dtype == torch.float32
            assert batch["labels"].dtype == batch["mask"].dtype == torch.float32
            assert batch["weight"].shape == (len(batch["labels"]),)
            assert ((batch["mask"] == 0) <= (batch["labels"] == 0)).all()  # missing -> 0
            rows += len(batch["labels"])
            label_sums = label_sums + batch["labels"].sum(0).double().numpy()
        expected_rows, expected_sums = _expected(cfg, df, name)
        assert rows == expected_rows
        np.testing.assert_allclose(label_sums, expected_sums, rtol=1e-5)


def test_read_and_preprocess_run_as_one_fused_task(by_value, logs) -> None:
    """Reading and preprocessing fuse into one Ray task (no extra object-store hop)."""
    cfg, files, _ = logs
    preprocessor = fit_preprocessor(cfg, files)
    ds = build_datasets(cfg, preprocessor, files)["validation"]
    for _ in iter_batches(ds, batch_layout(preprocessor), 512, "cpu"):
        pass
    assert "ReadParquet->MapBatches(_prepare)" in ds.stats()


def test_shuffled_batches_permute_rows_within_chunks(by_value, logs) -> None:
    """Shuffling keeps every row once, the batch count of plain iteration, and its seed."""
    cfg, files, _ = logs
    preprocessor = fit_preprocessor(cfg, files)
    ds = build_datasets(cfg, preprocessor, files, shuffle_files=False)["train"]
    ds.context.execution_options.preserve_order = True  # the same chunks every time

    def row_ids(shuffle: bool, seed: int | None) -> tuple[list[int], list[float]]:
        sizes, keys = [], []
        batches = iter_batches(ds, batch_layout(preprocessor), 100, "cpu", shuffle, seed)
        for batch in batches:
            sizes.append(len(batch["weight"]))
            # A row's identity: its categorical ids, dense values and labels summed.
            key = batch["categorical"].double().sum(1) * 1e3 + batch["dense"].double().sum(1)
            keys.extend((key + batch["labels"].double().sum(1)).tolist())
        return sizes, keys

    plain_sizes, plain = row_ids(False, None)
    sizes, shuffled = row_ids(True, 7)
    assert sizes == plain_sizes  # ceil(rows / 100) batches, only the last one short
    assert sorted(shuffled) == pytest.approx(sorted(plain))
    assert shuffled != plain
    assert row_ids(True, 7)[1] == shuffled


def _train_loop(config: dict) -> None:
    import ray.train

    counts = {}
    for name in ("train", "validation"):
        shard = ray.train.get_dataset_shard(name)
        rows, sums = 0, np.zeros(config["tasks"])
        for _ in range(config["epochs"]):
            batches = iter_batches(shard, config["layout"], 128, "cpu", shuffle=name == "train")
            for batch in batches:
                rows += len(batch["labels"])
                sums += batch["labels"].sum(0).double().numpy()
        counts[f"{name}_rows"] = rows
        counts[f"{name}_label_sums"] = sums.tolist()
    ray.train.report(counts)
    # Train V2 keeps only checkpointed reports in Result.metrics: the test collects the
    # per-worker counts from files written by each worker instead.
    rank = ray.train.get_context().get_world_rank()
    Path(config["out"], f"rank{rank}.json").write_text(pd.Series(counts).to_json())


def test_torch_trainer_two_workers_on_two_cpus(by_value, logs, tmp_path: Path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg, files, df = logs
    preprocessor = fit_preprocessor(cfg, files)
    datasets = build_datasets(cfg, preprocessor, files)
    datasets.pop("test")
    layout = batch_layout(preprocessor)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "tasks": len(cfg.tasks),
            "epochs": 2,
            "out": str(tmp_path),
            "layout": layout,
        },
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets=datasets,
        dataset_config=configure_ray_data(num_workers=2, cpus_per_worker=0.5),
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="ingest"),
    )
    trainer.fit()
    reports = [pd.read_json(p, typ="series") for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(reports) == 2
    epochs = 2
    for name in ("train", "validation"):
        rows, sums = _expected(cfg, df, name)
        seen = sum(r[f"{name}_rows"] for r in reports)
        total = np.sum([r[f"{name}_label_sums"] for r in reports], axis=0)
        if name == "validation":  # split exactly (whole blocks; a shard may be empty)
            assert seen == epochs * rows
            np.testing.assert_allclose(total, epochs * sums, rtol=1e-5)
        else:  # equal shards: at most one row (workers - 1) dropped per epoch
            assert min(r["train_rows"] for r in reports) > 0
            assert epochs * (rows - 1) <= seen <= epochs * rows
            assert reports[0]["train_rows"] == reports[1]["train_rows"]
            largest = np.array([df[t.label_column].max() for t in cfg.tasks])
            assert (np.abs(total - epochs * sums) <= epochs * largest + 1e-3).all()
