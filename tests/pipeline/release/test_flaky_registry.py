"""The alias moves only on evidence, against a real `mlflow server` behind a small local
proxy that answers the alias lookup with 500, 429 or 403: transient errors are retried with
backoff (MLflow's client policy) and the registration goes on; persistent ones, or a
refusal, fail the registration with the alias untouched and no version made."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from bench.harness import FaultyProxy
from pipeline.cli import app
from pipeline.release.registry import register_run
from tests.conftest import registry_client

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
    locks = [m.name for m in client.search_registered_models() if m.name.startswith(name + ".")]
    assert not locks  # the lease was released
