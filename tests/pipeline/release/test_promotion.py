"""`adatt register --promote-if-better ... --data`: promotion on a holdout comparison,
against a real MLflow server and local Ray, and two registrations racing for one alias.

Three models of clearly different quality on the tiny logs: the untrained network, the
shared 2-epoch training, and a network halfway between their weights; the tests order them by
their measured NE rather than assuming the order.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import ray
import torch

from pipeline.modelfile.store import read_model, resolve_model
from pipeline.release.evaluate import evaluate
from pipeline.release.lock import RELEASED, leases
from pipeline.release.registry import Evidence, register_run
from pipeline.tracking import tags
from tests.conftest import REPO_ROOT, log_untrained_run, registry_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
METRIC = "val/mean_ne"


def _weights(model_uri: str, tracking_uri: str) -> dict[str, torch.Tensor]:
    client = registry_client(tracking_uri)
    return read_model(resolve_model(model_uri, client), client).weights


@pytest.fixture(scope="module")
def ranked(served_training, untrained_run, mlflow_server, tiny_logs, tmp_path_factory):
    """(worst, middle, best) run ids by mean NE on the tiny logs, and their gaps."""
    _, trained = served_training
    start, end = untrained_run.network.state_dict(), _weights(trained.model_uri, mlflow_server)
    halfway = {k: (v + end[k]) / 2 if v.is_floating_point() else v for k, v in start.items()}
    middle = log_untrained_run(mlflow_server, tiny_logs, tmp_path_factory.mktemp("mid"), halfway)
    runs = [untrained_run, middle, trained]
    client = registry_client(mlflow_server)
    result = evaluate(client, [r.model_uri for r in runs], str(tiny_logs), bootstrap=50)
    ne = [result.metrics[i]["mean_ne"].value for i in range(3)]
    order = sorted(range(3), key=lambda i: -ne[i])  # worst (highest NE) first
    return [runs[i].run_id for i in order], sorted(ne, reverse=True)


def test_promotion_needs_a_significant_gain_and_records_the_evidence(
    ranked, mlflow_server, tiny_logs
) -> None:
    (worst, middle, best), ne = ranked
    client = registry_client(mlflow_server)
    register_run(client, worst, "promo-test", "champion")  # version 1
    evidence = Evidence(str(tiny_logs), min_gain=0.0, bootstrap=50)
    moved = register_run(client, middle, "promo-test", "champion", METRIC, evidence)
    version = client.get_model_version("promo-test", moved.version)
    low, high = (
        float(version.tags[tags.PROMOTION_GAIN_LOW]),
        float(version.tags[tags.PROMOTION_GAIN_HIGH]),
    )
    assert float(version.tags[tags.PROMOTION_GAIN]) == pytest.approx(ne[1] - ne[0], abs=1e-5)
    assert high < 0  # NE falls: the middle model is significantly better
    assert (moved.promoted, moved.holder) == (True, "2")
    assert version.tags[tags.PROMOTION_COMPARED_WITH] == "1"
    assert version.tags[tags.PROMOTION_DECISION] == "promoted"
    assert version.tags[tags.PROMOTION_METRIC] == "mean_ne"
    evaluation = client.get_run(version.tags[tags.PROMOTION_EVALUATION])
    assert evaluation.data.params["model.0"] == "models:/promo-test/1"
    # The challenger is scored as its run's model, before it becomes a version.
    challenger = client.get_logged_model(evaluation.data.params["model.1"].removeprefix("models:/"))
    assert challenger.source_run_id == middle
    assert low <= float(version.tags[tags.PROMOTION_GAIN]) <= high
    assert "upper bound" in moved.message and moved.message.endswith("@champion -> 2")

    # A real gain that does not clear the margin keeps the champion.
    strict = Evidence(str(tiny_logs), min_gain=10.0, bootstrap=50)
    kept = register_run(client, best, "promo-test", "champion", METRIC, strict)
    assert (kept.promoted, kept.holder) == (False, "2")
    assert (
        client.get_model_version("promo-test", kept.version).tags[tags.PROMOTION_DECISION] == "kept"
    )
    assert client.get_model_version_by_alias("promo-test", "champion").version == "2"
    assert not [t for t in leases(client, "promo-test").values() if RELEASED not in t]


def test_two_racing_registrations_leave_the_alias_on_the_best(
    ranked, mlflow_server, tiny_logs, tmp_path
) -> None:
    (worst, middle, best), _ = ranked
    client = registry_client(mlflow_server)
    register_run(client, worst, "race-test", "champion")  # version 1
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,  # the session's cluster
        "PYTHONPATH": str(REPO_ROOT),
    }
    command = [sys.executable, "-m", "pipeline.cli", "register", "--name", "race-test"]
    command += ["--promote-if-better", METRIC, "--data", str(tiny_logs), "--bootstrap", "50"]
    command += ["--tracking-uri", mlflow_server]
    logs = {run: tmp_path / f"{run}.log" for run in (middle, best)}
    racers = [
        subprocess.Popen(
            [*command, "--run", run], env=env, stdout=logs[run].open("w"), stderr=subprocess.STDOUT
        )
        for run in (middle, best)
    ]
    for racer, log in zip(racers, logs.values(), strict=True):
        assert racer.wait(timeout=600) == 0, log.read_text()[-3000:]
    versions = {v.tags["run_id"]: v for v in client.search_model_versions("name='race-test'")}
    champion = client.get_model_version_by_alias("race-test", "champion")
    assert champion.tags["run_id"] == best
    # One after the other: the second compared with what the first left, not with version 1.
    compared = {versions[run].tags[tags.PROMOTION_COMPARED_WITH] for run in (middle, best)}
    assert "1" in compared and compared != {"1"}, compared
    assert not [t for t in leases(client, "race-test").values() if RELEASED not in t]
