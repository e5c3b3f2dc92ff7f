"""What a finished training logs beside its metrics: fusion-weight plots, the oracle AUCs of
synthetic logs, a raw input example, and the summary printed at the end."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from sklearn.metrics import roc_auc_score

from pipeline.config import DataConfig
from pipeline.plots import fusion_heatmap
from pipeline.preprocess import Preprocessor
from pipeline.schema import filesystem_for
from pipeline.split import prune_files, split_mask, split_names

EXAMPLE_ROWS = 2048


def read_split(
    data: DataConfig, files: list[str], split: str, columns: list[str], max_rows: int | None = None
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


def raw_example(data: DataConfig, files: list[str], rows: int = EXAMPLE_ROWS) -> pd.DataFrame:
    """Up to `rows` raw validation rows, feature columns only (what the model reads)."""
    return read_split(data, files, "validation", data.feature_columns, max_rows=rows).to_pandas()


def log_fusion_plots(
    client: Any,
    run_id: str,
    network: torch.nn.Module,
    preprocessor: Preprocessor,
    example: pd.DataFrame,
) -> int:
    """Log one heatmap per fusion level (averaged over `example`); return how many."""
    arrays = preprocessor.transform(example, with_labels=False)
    batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    with torch.no_grad():
        weights = network.fusion_weights(batch)
    labels = network.fusion_weight_labels()
    for level, (matrix, (rows, columns)) in enumerate(zip(weights, labels, strict=True), 1):
        fig = fusion_heatmap(
            matrix.float().numpy(), rows, columns, f"fusion weights, level {level}"
        )
        client.log_figure(run_id, fig, f"fusion_weights/level_{level}.png")
        plt.close(fig)
    return len(weights)


def oracle_metrics(data: DataConfig, files: list[str]) -> dict[str, float]:
    """AUC of each binary task's oracle column (the true probability) on the evaluation split
    (test when configured, else validation): the ceiling a model can reach."""
    tasks = [t for t in data.tasks if t.oracle and t.type == "binary"]
    if not tasks:
        return {}
    split = "test" if "test" in split_names(data.split) else "validation"
    columns = sorted({c for t in tasks for c in (t.label_column, t.oracle)})
    table = read_split(data, files, split, columns).to_pandas()
    out = {}
    for task in tasks:
        observed = table[[task.label_column, task.oracle]].dropna()
        labels = observed[task.label_column].to_numpy()
        if len(np.unique(labels)) == 2:
            auc = roc_auc_score(labels, observed[task.oracle].to_numpy())
            out[f"oracle/{split}/{task.name}/auc"] = float(auc)
    return out


def summary_lines(
    run_id: str,
    tracking_uri: str,
    metrics: Mapping[str, float],
    oracle: Mapping[str, float],
    tasks: list[str],
) -> list[str]:
    """The lines `adatt train` prints when it finishes."""
    split = "test" if any(k.startswith("test/") for k in metrics) else "best/val"
    lines = [f"MLflow run: {run_id}"]
    for task in tasks:
        auc = metrics.get(f"{split}/{task}/auc")
        if auc is None:
            mse = metrics.get(f"{split}/{task}/mse")
            lines.append(f"  {task:<14} {split} mse={mse:.4f}" if mse is not None else f"  {task}")
            continue
        oracle_auc = next((v for k, v in oracle.items() if k.endswith(f"/{task}/auc")), None)
        ne = metrics.get(f"{split}/{task}/ne", float("nan"))
        line = f"  {task:<14} {split} auc={auc:.4f} ne={ne:.4f}"
        if oracle_auc is not None:
            line += f"  oracle auc={oracle_auc:.4f} (gap {oracle_auc - auc:+.4f})"
        lines.append(line)
    if tracking_uri.startswith("sqlite:///"):
        lines.append(f"Open the UI: mlflow ui --backend-store-uri {tracking_uri}")
    else:
        lines.append(f"Open the UI: {tracking_uri}/#/experiments (run {run_id})")
    return lines
