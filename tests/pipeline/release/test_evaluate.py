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
from pipeline.modelfile.store import resolve_model
from pipeline.ranking import binary_entropy
from pipeline.release.evaluate import evaluate
from pipeline.serving.scoring import load_scoring_model
from tests.conftest import registry_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BINARY = ("click", "like", "share")


def _reference(
    model_uri: str, rows: pd.DataFrame, client, groups: dict[str, str] | None = None
) -> dict[str, float]:
    """AUC, GAUC (each task's rows grouped by `groups[task]`, default the user) and NE of
    each binary task, computed directly with scikit-learn."""
    scores = load_scoring_model(resolve_model(model_uri, client), client).predict(rows)
    out = {}
    for task in BINARY:
        seen = rows[task].notna()
        y, p = rows.loc[seen, task].to_numpy(), scores.loc[seen, task].to_numpy(np.float64)
        users = rows.loc[seen, (groups or {}).get(task, "user_id")].to_numpy()
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


def test_null_groups_are_left_out_of_gauc_and_counted(
    untrained_run, mlflow_server, tiny_logs, tmp_path
):
    """Rows whose user is null form no group of GAUC (they used to form one big group);
    their count per task is reported and logged."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(tiny_logs)
    nulls = pa.array(np.arange(len(table)) < 500)
    user = pc.if_else(nulls, pa.scalar(None, table["user_id"].type), table["user_id"])
    table = table.set_column(table.schema.get_field_index("user_id"), "user_id", user)
    pq.write_table(table, tmp_path / "holdout.parquet")
    client = registry_client(mlflow_server)
    uri = untrained_run.model_uri
    result = evaluate(client, [uri, uri], str(tmp_path / "holdout.parquet"), bootstrap=20)
    rows = table.to_pandas()
    want = _reference(uri, rows.iloc[500:], client)
    scores = load_scoring_model(resolve_model(uri, client), client).predict(rows)
    for task in BINARY:
        assert result.counts[f"{task}/gauc_null_rows"] == rows[task].iloc[:500].notna().sum()
        assert result.metrics[0][f"{task}/gauc"].value == pytest.approx(want[f"{task}/gauc"])
        seen = rows[task].notna()  # AUC keeps the rows of null users
        auc = roc_auc_score(rows.loc[seen, task], scores.loc[seen, task])
        assert result.metrics[0][f"{task}/auc"].value == pytest.approx(auc, abs=1e-9)
    logged = client.get_run(result.run_id).data.metrics
    assert logged["click/gauc_null_rows"] == result.counts["click/gauc_null_rows"]


def test_nan_scores_fail_with_the_count_of_bad_rows(mlflow_server, tiny_logs, tmp_path) -> None:
    """A model whose `like` head gives NaN: evaluation stops naming the model, the task and
    the rows, instead of an AUC computed from NaN (which sorts as a finite number)."""
    import torch

    from models import build_model
    from pipeline.release.evaluate import EvaluationError
    from tests.conftest import log_untrained_run, tiny_config

    config = tiny_config(tiny_logs, tmp_path)
    torch.manual_seed(0)
    weights = build_model(config.model, config.data.feature_schema()).state_dict()
    weights["towers.head.bias"][1] = float("nan")  # the tasks' heads: click, like, share
    broken = log_untrained_run(mlflow_server, tiny_logs, tmp_path / "nan", weights)
    client = registry_client(mlflow_server)
    fine = log_untrained_run(mlflow_server, tiny_logs, tmp_path / "fine")
    with pytest.raises(EvaluationError) as caught:
        evaluate(client, [fine.model_uri, broken.model_uri], str(tiny_logs), bootstrap=20)
    labelled = pd.read_parquet(tiny_logs)["like"].notna().sum()
    pinned = resolve_model(broken.model_uri, client).uri
    assert str(caught.value) == (
        f"{pinned}: {labelled:,} row(s) with NaN or inf like scores; no metric is computed from them"
    )


def test_each_task_groups_its_gauc_by_its_own_column(mlflow_server, tiny_logs, tmp_path) -> None:
    """`like` grouped by item (its own `group_column`), the other tasks by user: each task's
    GAUC is over its own groups, and the bootstrap still draws users."""
    from tests.conftest import log_untrained_run

    tasks = (
        "data.tasks=[{name: click, oracle: p_click}, "
        "{name: like, oracle: p_like, group_column: item_id}, {name: share, oracle: p_share}, "
        "{name: watch_time, type: regression, oracle: e_watch_time, weight: 0.1}]"
    )
    model = log_untrained_run(mlflow_server, tiny_logs, tmp_path, overrides=(tasks,))
    assert [t.group_column for t in model.config.data.tasks] == [
        "user_id", "item_id", "user_id", None
    ]  # fmt: skip
    client = registry_client(mlflow_server)
    result = evaluate(client, [model.model_uri] * 2, str(tiny_logs), bootstrap=20)
    rows = pd.read_parquet(tiny_logs)
    want = _reference(model.model_uri, rows, client, {"like": "item_id"})
    by_user = _reference(model.model_uri, rows, client)
    assert want["like/gauc"] != pytest.approx(by_user["like/gauc"], abs=1e-3)  # it matters
    for task in BINARY:
        got = result.metrics[0][f"{task}/gauc"].value
        assert got == pytest.approx(want[f"{task}/gauc"], abs=1e-9), task
    assert result.counts["groups"] == rows["user_id"].nunique()
