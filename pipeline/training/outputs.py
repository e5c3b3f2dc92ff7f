"""What a finished training logs beside its metrics: the selected model (scoring raw rows),
its fusion-weight heatmaps (the AdaTT paper's figure 3) and the oracle AUCs of synthetic logs.

Figures are built with matplotlib's object API (`Figure`, no pyplot), which needs no
display backend on workers or CI and no global state.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score

from models import build_model
from pipeline.config import Config, DataConfig
from pipeline.data.files import InputFiles
from pipeline.data.preprocess import Preprocessor
from pipeline.data.sample import raw_example, read_split
from pipeline.data.split import split_names
from pipeline.modelfile.store import log_model
from pipeline.training.checkpoint import TrainingState


def fusion_heatmap(weights: np.ndarray, rows: list[str], columns: list[str], title: str) -> Figure:
    """A heatmap of one level's fusion weights, values written in each cell.

    Args:
        weights: [num_gates, num_experts] batch-averaged fusion weights.
        rows / columns: gate names (tasks, "shared") and expert names.
        title: the figure title, e.g. "level 1".
    """
    fig = Figure(figsize=(1.0 + 0.6 * len(columns), 1.0 + 0.5 * len(rows)))
    ax = fig.subplots()
    image = ax.imshow(weights, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i in range(weights.shape[0]):
        for j in range(weights.shape[1]):
            ax.text(j, i, f"{weights[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig


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
    return len(weights)


def oracle_metrics(data: DataConfig, files: InputFiles) -> dict[str, float]:
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


def log_outputs(
    client: Any,
    run_id: str,
    config: Config,
    final: TrainingState,
    preprocessor: Preprocessor,
    files: InputFiles,
) -> str | None:
    """Log the selected model (scoring raw rows) and the fusion-weight heatmaps; return the
    model's URI (None when `tracking.log_model` is off).

    The logged network holds its tables dense whatever `model.embeddings` trained it
    (`final.model` holds full tables), so scoring needs neither TorchRec nor a process group.
    """
    schema = config.data.feature_schema()
    model_config = config.model.model_copy(update={"embeddings": "dense"})
    network = build_model(model_config, schema)
    network.load_state_dict(final.model)
    network.eval()
    example = raw_example(config.data, files)
    log_fusion_plots(client, run_id, network, preprocessor, example)
    if not config.tracking.log_model:
        return None
    return log_model(
        client, run_id, network, model_config.model_dump(mode="json"), preprocessor, example.head(5)
    )
