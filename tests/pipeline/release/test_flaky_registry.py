"""The alias moves only on evidence, against a real `mlflow server` behind a small local
proxy that answers the alias calls with 500, 429 or 403: transient errors are retried with
backoff (MLflow's client policy) and the registration goes on; persistent ones, or a
refusal, fail the registration with the alias untouched and no version made. A failed alias
write leaves a version that no reader can take for a promotion, and a backfill goes on past
the days the server fails."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import yaml
from mlflow.exceptions import MlflowException
from typer.testing import CliRunner

from bench.harness import FaultyProxy
from pipeline.cli import app
from pipeline.release.lock import RELEASED, leases
from pipeline.release.registry import Evidence, register_run
from pipeline.tracking import tags
from tests.conftest import registry_client, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def proxy(mlflow_server) -> Iterator[FaultyProxy]:
    faulty = FaultyProxy(mlflow_server)
    yield faulty
    faulty.close()


@pytest.fixture
def fast_retries(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def _register(proxy: FaultyProxy, run_id: str, name: str):
    command = ["register", "--run", run_id, "--name", name, "--tracking-uri", proxy.url]
    return CliRunner().invoke(app, [*command, "--promote-if-better", "val/mean_auc"])


@pytest.mark.parametrize("status", [500, 429])
def test_transient_errors_are_retried_and_the_promotion_goes_on(
    proxy, served_training, untrained_run, mlflow_server, fast_retries, status: int
) -> None:
    client = registry_client(mlflow_server)
    name = f"flaky-{status}"
    register_run(client, untrained_run.run_id, name, "champion")  # version 1
    proxy.inject(status, 2)
    result = _register(proxy, served_training[1].run_id, name)
    assert result.exit_code == 0, result.output
    assert proxy.injected == 2  # both answered with errors, then retried
    assert "registered " + name + " version 2" in result.stdout
    assert "vs @champion version 1" in result.stdout  # the holder was read, not assumed


@pytest.mark.parametrize(("status", "count"), [(500, -1), (429, -1), (403, 1)])
def test_no_evidence_no_move(
    proxy, served_training, untrained_run, mlflow_server, fast_retries, status: int, count: int
) -> None:
    client = registry_client(mlflow_server)
    name = f"no-evidence-{status}"
    register_run(client, untrained_run.run_id, name, "champion")  # version 1
    proxy.inject(status, count)
    result = _register(proxy, served_training[1].run_id, name)
    proxy.inject(status, 0)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the alias was not moved" in errors[0], result.output
    # Retried until MLflow's client gives up ("too many 500 error responses"), or refused.
    assert (str(status) if status != 403 else "PERMISSION_DENIED") in errors[0]
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert [v.version for v in client.search_model_versions(f"name='{name}'")] == ["1"]
    held = [t for t in leases(client, name).values() if RELEASED not in t]
    assert not held  # the lease was released


def test_a_failed_alias_write_is_not_recorded_as_a_promotion(
    proxy, served_training, untrained_run, mlflow_server, tiny_logs, fast_retries
) -> None:
    """The holdout says promote, then every alias write fails (500): the version exists but
    its decision is `failed`, never `promoted` (b69f646 wrote `promoted` before the write),
    and the alias stays."""
    client = registry_client(mlflow_server)
    name = "alias-write-fails"
    register_run(client, untrained_run.run_id, name, "champion")  # version 1
    proxy.inject(500, -1, method="POST")  # the alias write only; its lookup answers
    evidence = Evidence(str(tiny_logs), min_gain=-1.0, bootstrap=20)  # any gain promotes
    with pytest.raises(MlflowException) as err:
        register_run(
            registry_client(proxy.url), served_training[1].run_id, name, "champion",
            "val/mean_ne", evidence,
        )  # fmt: skip
    assert proxy.injected > 0 and "registered-models/alias" in str(err.value)
    proxy.inject(500, 0)
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    challenger = client.get_model_version(name, "2")
    assert challenger.tags[tags.PROMOTION_DECISION] == "failed"
    assert challenger.tags[tags.PROMOTION_COMPARED_WITH] == "1"


def test_a_backfill_goes_on_past_days_the_server_fails(
    proxy, untrained_run, mlflow_server, tiny_logs, tmp_path, fast_retries
) -> None:
    """`retrain --since`: resolving the champion hits a persistent 500 on every day; each
    day fails with one line and the backfill goes on to the next (b69f646 stopped at the
    first with a traceback). Nothing is trained or registered."""
    client = registry_client(mlflow_server)
    register_run(client, untrained_run.run_id, "backfill-flaky", "champion")
    config = tiny_config(tiny_logs, tmp_path, f"tracking.tracking_uri={proxy.url}")
    path = tmp_path / "daily.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    proxy.inject(500, -1)
    command = ["retrain", "--config", str(path), "--model", "models:/backfill-flaky@champion"]
    result = CliRunner().invoke(app, [*command, "--since", "2024-01-13", "--day", "2024-01-14"])
    proxy.inject(500, 0)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert [e.split(":", 2)[1] for e in errors] == [" retrain 2024-01-13", " retrain 2024-01-14"]
    assert all("the MLflow server answered" in e and "500" in e for e in errors), errors
    assert [v.version for v in client.search_model_versions("name='backfill-flaky'")] == ["1"]
