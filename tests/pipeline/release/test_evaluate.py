"""`adatt evaluate` against a real MLflow server and local Ray: both models scored on the
same rows, each metric equal to a direct scikit-learn computation, paired intervals."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss, roc_auc_score
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.ranking import binary_entropy
from pipeline.release.evaluate import evaluate
from pipeline.serving.scoring import load_scoring_model
from pipeline.tracking.model_store import resolve_model
from tests.conftest import registry_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BINARY = ("click", "like", "share")


def _reference(model_uri: str, rows: pd.DataFrame, client) -> dict[str, float]:
    scores = load_scoring_model(resolve_model(model_uri, client), client).predict(rows)
    out = {}
    for task in BINARY:
        seen = rows[task].notna()
        y, p = rows.loc[seen, task].to_numpy(), scores.loc[seen, task].to_numpy(np.float64)
        users = rows.loc[seen, "user_id"].to_numpy()
        total = weight = 0.0
        for user in np.unique(users):
            mine = users == user
            if len(np.unique(y[mine])) == 2:
                total += roc_auc_score(y[mine], p[mine]) * mine.sum()
                weight += mine.sum()
        out[f"{task}/auc"] = roc_auc_score(y, p)
        out[f"{task}/gauc"] = total / weight
        out[f"{task}/ne"] = log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)) / binary_entropy(y.mean())
    return out


def test_evaluate_scores_both_models_on_the_same_rows(
    served_training, untrained_run, mlflow_server, tiny_logs, s3_logs
) -> None:
    """The holdout in S3; every metric reduced on the workers equals a direct computation."""
    _, trained = served_training
    champion, challenger = untrained_run.model_uri, trained.model_uri
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            *("--model", champion, "--model", challenger, "--data", s3_logs),
            *("--bootstrap", "50", "--tracking-uri", mlflow_server),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    # (MLflow itself prints the run's URL when a run on a server ends.)
    assert "\n6,000 rows; [95 % bootstrap interval by group]\n" in result.stdout
    assert re.search(r"click/gauc\s+0\.\d{4} \[0\.\d{4}, 0\.\d{4}\]", result.stdout)
    run_id = re.search(r"logged to MLflow run (\w+)", result.stdout).group(1)
    client = registry_client(mlflow_server)
    run = client.get_run(run_id)
    assert run.data.params["model.0"] == champion and run.data.params["model.1"] == challenger
    metrics = run.data.metrics
    assert (
        metrics["rows"] == 6000
        and metrics["groups"] == pd.read_parquet(tiny_logs)["user_id"].nunique()
    )

    rows = pd.read_parquet(tiny_logs)
    want = [_reference(champion, rows, client), _reference(challenger, rows, client)]
    for key in want[0]:
        for i in (0, 1):
            assert metrics[f"{i}/{key}"] == pytest.approx(want[i][key], abs=1e-6), (i, key)
            assert metrics[f"{i}/{key}/low"] <= metrics[f"{i}/{key}"] <= metrics[f"{i}/{key}/high"]
        gain = metrics[f"gain.1/{key}"]
        assert gain == pytest.approx(want[1][key] - want[0][key], abs=1e-6), key
        assert metrics[f"gain.1/{key}/low"] <= gain <= metrics[f"gain.1/{key}/high"]
    mean = np.mean([want[1][f"{t}/gauc"] for t in BINARY])
    assert metrics["1/mean_gauc"] == pytest.approx(mean, abs=1e-6)
    assert "evaluation.json" in {a.path for a in client.list_artifacts(run_id)}


def test_a_model_against_itself_gains_exactly_nothing(served_training, mlflow_server, tiny_logs):
    _, trained = served_training
    client = registry_client(mlflow_server)
    same = evaluate(client, [trained.model_uri] * 2, str(tiny_logs), bootstrap=20)
    for key, gain in same.gains[1].items():
        assert (gain.value, gain.low, gain.high) == (0.0, 0.0, 0.0), key
    first = same.metrics[0]["click/gauc"]
    assert first.low < first.value < first.high  # the model's own interval is not empty


def test_one_model_or_no_groups_is_refused(served_training, mlflow_server, tiny_logs) -> None:
    _, trained = served_training
    one = CliRunner().invoke(
        app,
        ["evaluate", "--model", trained.model_uri, "--data", str(tiny_logs)]
        + ["--tracking-uri", mlflow_server],
    )
    assert one.exit_code == 2 and "give at least two models" in one.stderr
    missing = CliRunner().invoke(
        app,
        ["evaluate", "--model", trained.model_uri, "--model", trained.model_uri]
        + ["--data", str(tiny_logs), "--group-column", "viewer", "--tracking-uri", mlflow_server],
    )
    assert missing.exit_code == 2 and "viewer" in missing.stderr, missing.output
