"""Small reads of raw rows on the driver: one split's rows for reports and checks, and the
input example a logged model carries. Training itself streams through Ray Data."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import DataConfig
from pipeline.data.files import InputFiles, filesystem_for
from pipeline.data.split import prune_files, split_mask

EXAMPLE_ROWS = 2048


def read_split(
    data: DataConfig,
    files: InputFiles,
    split: str,
    columns: list[str],
    max_rows: int | None = None,
) -> pa.Table:
    """The raw rows of one split (selected columns), read file by file on the driver.

    For reports and checks on small slices, not for training: training streams through Ray.
    """
    read = list(dict.fromkeys([*columns, data.split.column]))
    tables, rows = [], 0
    for file in prune_files(data.split, files, split):
        fs, path = filesystem_for(file)
        table = pq.read_table(path, columns=read, filesystem=fs)
        table = table.filter(split_mask(table[data.split.column], data.split, split))
        tables.append(table.select(columns))
        rows += table.num_rows
        if max_rows is not None and rows >= max_rows:
            break
    out = pa.concat_tables(tables)
    return out.slice(0, max_rows) if max_rows is not None else out


def raw_example(data: DataConfig, files: InputFiles, rows: int = EXAMPLE_ROWS) -> pd.DataFrame:
    """Up to `rows` raw validation rows, feature columns only (what the model reads)."""
    return read_split(data, files, "validation", data.feature_columns, max_rows=rows).to_pandas()
