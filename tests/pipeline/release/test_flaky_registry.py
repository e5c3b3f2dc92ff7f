"""The alias moves only on evidence, against a real `mlflow server` behind a small local
proxy that answers the alias lookup with 500, 429 or 403: transient errors are retried with
backoff (MLflow's client policy) and the registration goes on; persistent ones, or a
refusal, fail the registration with the alias untouched and no version made."""

from __future__ import annotations

import http.server
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.release.registry import register_run
from tests.conftest import registry_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ALIAS_PATH = "/registered-models/alias"  # GET get_model_version_by_alias
# What an MLflow server puts in the body with each status.
ERROR_CODES = {500: "INTERNAL_ERROR", 429: "REQUEST_LIMIT_EXCEEDED", 403: "PERMISSION_DENIED"}


class FaultyProxy:
    """A forwarding proxy on 127.0.0.1 that answers the next `count` alias lookups with
    `status` (count -1: every one)."""

    def __init__(self, upstream: str) -> None:
        self.upstream, self.status, self.count, self.injected = upstream, 500, 0, 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self) -> None:
                if ALIAS_PATH in self.path and proxy.count != 0:
                    proxy.count -= 1 if proxy.count > 0 else 0
                    proxy.injected += 1
                    code = ERROR_CODES[proxy.status]
                    body = f'{{"error_code": "{code}", "message": "injected"}}'.encode()
                    self.send_response(proxy.status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                request = urllib.request.Request(
                    proxy.upstream + self.path, data=data, headers=headers, method=self.command
                )
                try:
                    with urllib.request.urlopen(request, timeout=120) as reply:
                        status, body, reply_headers = reply.status, reply.read(), reply.headers
                except urllib.error.HTTPError as err:
                    status, body, reply_headers = err.code, err.read(), err.headers
                self.send_response(status)
                for key, value in reply_headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def inject(self, status: int, count: int) -> None:
        self.status, self.count, self.injected = status, count, 0


@pytest.fixture(scope="module")
def proxy(mlflow_server) -> Iterator[FaultyProxy]:
    faulty = FaultyProxy(mlflow_server)
    yield faulty
    faulty.server.shutdown()


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
