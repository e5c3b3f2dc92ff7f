"""The summary table and the search plot, from hand-made trial rows."""

from __future__ import annotations

import matplotlib.pyplot as plt

from tests.conftest import REPO_ROOT
from tune.report import TrialRow, _trial_id_from_path, search_plot, summary_table
from tune.space import parse_search_spec


def spec_and_rows():
    raw = {
        "base": str(REPO_ROOT / "configs" / "synthetic.yaml"),
        "search": {
            "model.expert_dims": {"choice": [[16], [16, 8]]},
            "train.lr": {"loguniform": [1e-4, 1e-2]},
        },
        "tune": {"top": 3},
    }
    spec = parse_search_spec(raw, "spec", REPO_ROOT / "configs", "t")
    rows = [
        TrialRow(
            "a_00000", "r0", "completed", 3, 3, 0.70, {"model.expert_dims": [16], "train.lr": 1e-3}
        ),
        TrialRow(
            "a_00001", "r1", "stopped", 0, 1, 0.72, {"model.expert_dims": [16, 8], "train.lr": 1e-4}
        ),
        TrialRow(
            "a_00002",
            "r2",
            "completed",
            3,
            3,
            0.74,
            {"model.expert_dims": [16, 8], "train.lr": 5e-3},
        ),
        TrialRow(
            "a_00003", None, "error", 0, 0, None, {"model.expert_dims": [16], "train.lr": 2e-4}
        ),
    ]
    return spec, rows


def test_table_ranks_completed_trials_first_by_metric() -> None:
    spec, rows = spec_and_rows()
    lines = summary_table(rows, spec)
    assert lines[0].split() == [
        "rank",
        "trial",
        "status",
        "epochs",
        "validations",
        "val/mean_auc",
        "model.expert_dims",
        "train.lr",
    ]
    assert [line.split()[1] for line in lines[1:]] == ["a_00002", "a_00000", "a_00001"]
    assert "[16, 8]" in lines[1] and "0.7400" in lines[1] and "0.005" in lines[1]


def test_plot_has_one_panel_per_searched_field() -> None:
    spec, rows = spec_and_rows()
    fig = search_plot(rows, spec, rows[2])
    axes = fig.get_axes()
    assert [ax.get_xlabel() for ax in axes] == ["model.expert_dims", "train.lr"]
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["[16]", "[16, 8]"]
    assert axes[1].get_xscale() == "log"
    plt.close(fig)


def test_trial_id_of_a_trial_that_never_reported() -> None:
    path = "/runs/grid/run_trial_8b625_00003_3_train_lr=0.0000_2026-11-28_13-41-19"
    assert _trial_id_from_path(path) == "8b625_00003"
