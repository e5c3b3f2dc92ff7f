"""bench/feed.py's wide schema: its logs pass the product's own checks under its config,
and the config's id tables are as large as asked (`bench/gpu_job.py --wide-buckets` shrinks
them for a dry run on CPUs)."""

from __future__ import annotations

from pathlib import Path

from bench.feed import WIDE_CATEGORICAL, WIDE_DENSE, wide_config, write_wide_logs
from pipeline.config import load_config
from pipeline.data.validate import check_schema


def test_wide_config_takes_its_buckets_and_its_logs_pass_the_schema_check(tmp_path: Path) -> None:
    write_wide_logs(tmp_path / "logs", rows=320)
    config = load_config(wide_config(tmp_path, tmp_path / "logs", buckets=1_000), [])
    assert [f.buckets for f in config.data.categorical] == [1_000] * WIDE_CATEGORICAL
    assert [f.buckets for f in config.data.multi_hot] == [500, 500]
    assert len(config.data.dense) == WIDE_DENSE
    assert check_schema(config.data).paths  # the 16 files, every column of the config
