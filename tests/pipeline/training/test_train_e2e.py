"""`adatt train` end to end: the session's shared training (`served_training`: two Ray nodes,
2 workers, logs and checkpoints in S3, an `mlflow server` with its artifacts in S3), checked
for what it logs; a failed run resumed (long tier) on the same cluster."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

from models import build_model
from pipeline.data.files import InputFiles
from pipeline.data.preprocess import Preprocessor
from pipeline.data.sample import read_split
from pipeline.modelfile.format import score_frame
from pipeline.tracking import tags
from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.driver import run_training
from pipeline.training.optim import lr_factor
from pipeline.training.resume import checkpoint_folders, read_state
from tests.conftest import by_epoch, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_run_has_params_metrics_plots_and_model(served_training) -> None:
    config, outcome = served_training
    client = MlflowClient(outcome.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == config.model.name
    assert run.data.params["train.epochs"] == "2"
    for task in config.data.tasks:
        metric = "auc" if task.type == "binary" else "mse"
        history = by_epoch(client, outcome.run_id, f"val/{task.name}/{metric}")
        assert sorted(history) == [1, 2], task.name
    epochs = client.get_metric_history(outcome.run_id, "epoch")
    assert [m.value for m in epochs] == [1, 2]
    # Every metric is logged at its global step: step metrics every `log_every` steps.
    steps = [m.step for m in client.get_metric_history(outcome.run_id, "step/loss")]
    assert steps == list(range(10, epochs[-1].step + 1, 10))
    assert epochs[1].step == 2 * epochs[0].step
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id, "fusion_weights")}
    assert artifacts == {f"fusion_weights/level_{i}.png" for i in range(1, config.model.levels + 1)}
    assert outcome.model_uri is not None
    # Tiny data cannot teach click much in 2 epochs; what must hold is that the loss fell.
    assert outcome.checkpoint_path.startswith("s3://")
    history = read_state(outcome.checkpoint_path).history
    assert history[-1]["train/loss"] < history[0]["train/loss"]


def test_logged_model_matches_trained_model(served_training, tiny_logs) -> None:
    config, outcome = served_training
    # The same rows as the run's S3 copy, read from local disk.
    files = InputFiles.read(sorted(str(p) for p in Path(tiny_logs).rglob("*.parquet")))
    state = read_state(outcome.checkpoint_path)
    network = build_model(config.model, config.data.feature_schema())
    network.load_state_dict(state.model)
    preprocessor = Preprocessor.from_dict(state.preprocessor)
    rows = read_split(config.data, files, "test", config.data.columns()).to_pandas()
    mlflow.set_tracking_uri(outcome.tracking_uri)
    loaded = mlflow.pyfunc.load_model(outcome.model_uri)
    features = rows[config.data.feature_columns]
    logged = loaded.predict(features)
    direct = score_frame(network, preprocessor, config.data.tasks, features)
    np.testing.assert_allclose(logged.to_numpy(), direct.to_numpy(), atol=1e-6)
    # The test AUC the run reports is the AUC of these scores over all workers' rows.
    click = rows["click"].notna()
    auc = roc_auc_score(rows.loc[click, "click"], logged.loc[click, "click"])
    assert outcome.metrics["test/click/auc"] == pytest.approx(auc, abs=1e-4)
    # GAUC: each user's AUC weighted by the user's rows, users with one class left out,
    # computed across the two workers; the reference is per-user sklearn AUCs on one host.
    for task in ("click", "like", "share"):
        seen = rows[task].notna()
        frame = pd.DataFrame(
            {
                "user": rows.loc[seen, "user_id"],
                "y": rows.loc[seen, task],
                "p": logged.loc[seen, task],
            }
        )
        both = frame.groupby("user").filter(lambda g: g["y"].nunique() == 2)
        per_user = both.groupby("user").apply(lambda g: roc_auc_score(g["y"], g["p"]) * len(g))
        gauc = per_user.sum() / len(both)
        assert outcome.metrics[f"test/{task}/gauc"] == pytest.approx(gauc, abs=1e-4), task
        assert outcome.metrics[f"test/{task}/gauc_groups"] == both["user"].nunique()


def _console(capfd: pytest.CaptureFixture[str], until: str, wait_s: float = 15.0) -> str:
    """What the run printed to stdout and stderr, with Ray's worker and actor logs (they reach
    the driver a moment later): read until `until` appears or `wait_s` passes."""
    text, deadline = "", time.monotonic() + wait_s
    while True:
        out, err = capfd.readouterr()
        text += out + err
        if until in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


@pytest.mark.long
def test_failed_run_is_marked_failed_and_resume_continues(
    ray_cluster, tiny_logs, tmp_path, capfd
) -> None:
    config = tiny_config(tiny_logs, tmp_path, "train.epochs=3", "train.lr_schedule=cosine")
    os.environ["ADATT_FAULT"] = "raise@2"
    try:
        with pytest.raises(Exception, match="injected failure"):
            run_training(config)
    finally:
        del os.environ["ADATT_FAULT"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("adatt").experiment_id])
    assert run.info.status == "FAILED"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "epoch")] == [1]

    outcome = run_training(config, resume=run.info.run_id)
    assert outcome.run_id == run.info.run_id
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    epochs = [m.value for m in client.get_metric_history(run.info.run_id, "epoch")]
    assert sorted(epochs) == [1, 2, 3]
    # Adam's step count continued from epoch 1's checkpoint: 3 epochs' worth of steps.
    final = load_checkpoint(Path(outcome.checkpoint_path))
    per_epoch = _optimizer_steps(Path(run.data.tags[tags.STORAGE]) / run.data.tags[tags.RAY_RUN])
    assert _adam_step(final.optimizer) == 3 * per_epoch
    # The resumed epochs continue the cosine schedule where epoch 1 left it.
    lrs = by_epoch(client, run.info.run_id, "train/lr")
    expected = [config.train.lr * lr_factor("cosine", e, 3) for e in (1, 2, 3)]
    assert sorted(lrs) == [1, 2, 3]
    assert [lrs[e] for e in (1, 2, 3)] == pytest.approx(expected)
    assert final.optimizer["param_groups"][0]["lr"] == pytest.approx(expected[-1])

    # A console a person can read: one summary line per epoch, not Ray's report dicts.
    console = _console(capfd, until="epoch 3 |")
    epochs = [line for line in console.splitlines() if re.search(r"epoch \d \| click auc=", line)]
    assert [re.search(r"epoch (\d)", line).group(1) for line in epochs] == ["1", "2", "3"]
    assert "TrainingReport(" not in console


def _adam_step(optimizer_state: dict) -> int:
    return int(next(iter(optimizer_state["state"].values()))["step"])


def _optimizer_steps(run_folder: Path) -> int:
    """Adam steps in one epoch, from the epoch-1 history entry's row count."""
    state = load_checkpoint(checkpoint_folders(str(run_folder.parent), run_folder.name)[0])
    first = state.history[0]
    return int(first["train/steps_per_worker"])
