"""What the tests and the benches share: real servers on 127.0.0.1 (an `mlflow server`, and
a forwarding proxy in front of it that injects server errors), the tiny training config,
and a model logged without training (an untrained network with fitted preprocessing)."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

from pipeline.ports import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_OVERRIDES = [
    "train.log_every=10",  # step metrics at fixed steps (the 30 s default is the clock's)
    "model.expert_dims=[16, 8]",
    "model.tower_dims=[8]",
    "model.experts_per_task=2",
    "model.shared_experts=1",
    "train.epochs=2",
    "train.num_workers=2",
    "train.threads_per_worker=1",
    "train.lr=0.01",
    "data.batch_size=256",
]

ALIAS_PATH = "/registered-models/alias"  # GET get_model_version_by_alias, POST set alias
# What an MLflow server puts in the body with each status.
ERROR_CODES = {500: "INTERNAL_ERROR", 429: "REQUEST_LIMIT_EXCEEDED", 403: "PERMISSION_DENIED"}


@contextlib.contextmanager
def mlflow_server(folder: Path, artifacts: str) -> Iterator[str]:
    """A real `mlflow server` (SQLite backend in `folder`, artifacts proxied to
    `artifacts`, e.g. s3://bucket/mlflow) for the duration; its URI."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)),
        *("--workers", "1", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db"),
        *("--artifacts-destination", artifacts),
    ]
    log = (folder / "server.log").open("w")
    # Its own session: the server's worker processes are stopped with it.
    # No job runner: its worker processes (for GenAI jobs) only compete for the 2 CPUs.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not start: {(folder / 'server.log').read_text()}"
                )
            time.sleep(0.5)
        yield uri
    finally:
        stop_group(server)
        log.close()


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group `proc` leads (started with `start_new_session`), then
    SIGKILL after 20 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class FaultyProxy:
    """A forwarding proxy on 127.0.0.1 that answers the next `count` requests whose path
    holds `path` (default: the alias calls), of `method` if given, with `status` (count -1:
    every one)."""

    def __init__(self, upstream: str) -> None:
        self.upstream, self.status, self.count, self.injected = upstream, 500, 0, 0
        self.path, self.method = ALIAS_PATH, None
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _faulty(self) -> bool:
                method = proxy.method in (None, self.command)
                return proxy.path in self.path and method and proxy.count != 0

            def _forward(self) -> None:
                if self._faulty():
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

    def inject(
        self, status: int, count: int, path: str = ALIAS_PATH, method: str | None = None
    ) -> None:
        self.status, self.count, self.injected, self.path = status, count, 0, path
        self.method = method

    def close(self) -> None:
        self.server.shutdown()


def tiny_config(logs: Path | str, workdir: Path, *overrides: str):
    """The synthetic config shrunk for tests; MLflow and checkpoints under `workdir`."""
    from pipeline.config import load_config

    return load_config(
        REPO_ROOT / "configs" / "synthetic.yaml",
        [
            f"data.path={logs}",
            f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db",
            f"train.storage_path={workdir}/runs",
            *TINY_OVERRIDES,
            *overrides,
        ],
    )


def untrained_network(config, seed: int = 0):
    """The config's network as it starts, before any step (seeded with `seed`)."""
    import torch

    from models import build_model

    torch.manual_seed(seed)
    return build_model(config.model, config.data.feature_schema()).eval()


def split_metrics(config, network, preprocessor, files, split: str) -> dict[str, float]:
    """`network`'s metrics over one split's rows (`val/<task>/auc` for the validation
    split, `test/...`; `logloss`, `ne`, ...), computed in this process (no Ray), GAUC left
    out."""
    import torch

    from pipeline.data.sample import read_split
    from pipeline.training.metrics import MultiTaskMetrics

    rows = read_split(config.data, files, split, config.data.columns()).to_pandas()
    batch = {k: torch.from_numpy(v) for k, v in preprocessor.transform(rows).items()}
    tasks = [t.model_copy(update={"group_column": None}) for t in config.data.tasks]
    metrics = MultiTaskMetrics(tasks, torch.device("cpu"))
    with torch.no_grad():
        metrics.update(network(batch), batch["labels"], batch["mask"])
    return metrics.compute("val" if split == "validation" else split)


def log_untrained_run(
    tracking_uri: str, logs: Path, workdir: Path, weights=None, overrides: tuple[str, ...] = ()
):
    """A run made without Ray: an untrained tiny network (seed 0; or `weights`) with fitted
    preprocessing, logged as the scoring model, with its real validation metrics logged as
    `best/val/...` the way a training run logs its selected epoch's. `overrides` change the
    tiny config."""
    from pipeline.data.fit import fit_preprocessor
    from pipeline.data.sample import raw_example
    from pipeline.data.validate import check_schema
    from pipeline.modelfile.store import log_model
    from pipeline.tracking.runs import client_for, log_metrics, start_run

    config = tiny_config(logs, workdir, f"tracking.tracking_uri={tracking_uri}", *overrides)
    files = check_schema(config.data)
    preprocessor = fit_preprocessor(config.data, files)
    network = untrained_network(config)
    if weights is not None:
        network.load_state_dict(weights)
    client = client_for(tracking_uri)
    tags = {"adatt.git_commit": "0" * 40, "adatt.model": config.model.name}
    run_id = start_run(client, config, tracking_uri, tags=tags)
    example = raw_example(config.data, files).head(5)
    model_config = config.model.model_dump(mode="json")
    model_uri = log_model(client, run_id, network, model_config, preprocessor, example)
    validation = split_metrics(config, network, preprocessor, files, "validation")
    log_metrics(client, run_id, {f"best/{k}": v for k, v in validation.items()})
    client.set_terminated(run_id)
    tasks = [t.model_copy(update={"group_column": None}) for t in config.data.tasks]
    return SimpleNamespace(
        config=config,
        run_id=run_id,
        model_uri=model_uri,
        network=network,
        preprocessor=preprocessor,
        tasks=tasks,
        files=files,
    )


def by_epoch(client, run_id: str, key: str) -> dict[int, float]:
    """A training's metric at each epoch's end: the run logs every metric at its global
    step, and `epoch` at the step that ends each epoch."""
    ends = {m.step: int(m.value) for m in client.get_metric_history(run_id, "epoch")}
    return {ends[m.step]: m.value for m in client.get_metric_history(run_id, key) if m.step in ends}
