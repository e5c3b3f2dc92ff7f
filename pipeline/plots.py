"""Fusion-weight heatmaps (the AdaTT paper's figure 3): one tasks x experts matrix per level."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def fusion_heatmap(weights: np.ndarray, rows: list[str], columns: list[str], title: str) -> Figure:
    """A heatmap of one level's fusion weights, values written in each cell.

    Args:
        weights: [num_gates, num_experts] batch-averaged fusion weights.
        rows / columns: gate names (tasks, "shared") and expert names.
        title: the figure title, e.g. "level 1".
    """
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(columns), 1.0 + 0.5 * len(rows)))
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
