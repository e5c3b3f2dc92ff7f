"""`adatt predict` against a real MLflow server (artifacts in S3) and the two-node Ray
cluster: S3 in, S3 out, committed with a `_SUCCESS` marker; scores equal the in-process
model's, one output row per input row, schema errors before any work, a failed run leaves
nothing; the registered model loads in a fresh Python process without Ray, and over
`mlflow models serve`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.release.registry import register_run
from tests.conftest import REPO_ROOT, corrupt_column_pages, free_port, registry_client, s3_fs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NAME = "predict-test"
TASKS = ["click", "like", "share", "watch_time"]


@pytest.fixture(scope="module")
def champion(served_training, mlflow_server) -> str:
    _, outcome = served_training
    register_run(registry_client(mlflow_server), outcome.run_id, NAME, "champion")
    return f"models:/{NAME}@champion"


def _predict(mlflow_server: str, *args: str):
    command = ["predict", "--tracking-uri", mlflow_server, *args]
    return CliRunner().invoke(app, command, catch_exceptions=False)


def test_predict_reads_and_writes_s3_and_scores_every_row_like_the_model(
    champion, mlflow_server, s3, s3_logs, tiny_logs, tmp_path
):
    out = s3.uri("scores", "predict")
    result = _predict(
        mlflow_server,
        *("--model", champion, "--input", s3_logs, "--output", out),
        *("--passthrough", "event_id", "--passthrough", "user_id", "--batch-size", "1000"),
    )
    assert result.exit_code == 0, result.output
    assert f"scored 6,000 rows into {out}" in result.stdout
    fs, folder = s3_fs(), out.removeprefix("s3://")
    marker = json.loads(fs.open_input_stream(f"{folder}/_SUCCESS").read())
    # The marker names the pinned version (a promotion meanwhile changes nothing), the row
    # count, the inputs and the committed files; nothing is left under `_temporary`.
    assert (marker["model"], marker["given"], marker["rows"]) == (
        f"models:/{NAME}/1",
        champion,
        6000,
    )
    assert marker["inputs"] == sorted(marker["inputs"]) and len(marker["inputs"]) == 14
    assert all(i.startswith(s3_logs) for i in marker["inputs"])
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(folder, recursive=True))]
    assert "_temporary" not in names and sorted(marker["files"]) == sorted(
        n for n in names if n.endswith(".parquet")
    )
    rows = pd.read_parquet(tiny_logs)
    scores = pq.read_table(folder, filesystem=fs).to_pandas()  # `_SUCCESS` is not data
    assert list(scores.columns) == ["event_id", "user_id", *TASKS]
    assert len(scores) == len(rows) == 6000 and scores["event_id"].is_unique
    assert set(scores["event_id"]) == set(rows["event_id"])

    mlflow.set_tracking_uri(mlflow_server)
    expected = mlflow.pyfunc.load_model(champion).predict(rows)
    expected[["event_id", "user_id"]] = rows[["event_id", "user_id"]]
    joined = scores.merge(expected, on="event_id", suffixes=("", "_model"))
    assert len(joined) == 6000 and (joined["user_id"] == joined["user_id_model"]).all()
    for task in TASKS:
        np.testing.assert_allclose(joined[task], joined[f"{task}_model"], atol=1e-6)

    # Load anywhere: a fresh interpreter, outside the checkout, without PYTHONPATH or Ray,
    # loads the alias from the server and gives the same scores, with the installed loader.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = mlflow_server
    fresh = tmp_path / "fresh.parquet"
    code = (
        "import sys, tempfile, mlflow, pandas as pd\n"
        f"rows = pd.read_parquet({str(tiny_logs)!r})\n"
        f"mlflow.pyfunc.load_model({champion!r}).predict(rows).to_parquet({str(fresh)!r})\n"
        "assert 'ray' not in sys.modules\n"
        "print(sys.modules['pipeline.serving.loader'].__file__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loader = done.stdout.strip().splitlines()[-1]
    assert Path(loader) == REPO_ROOT / "pipeline" / "serving" / "loader.py"  # installed, -e
    np.testing.assert_allclose(
        pd.read_parquet(fresh)[TASKS].to_numpy(), expected[TASKS].to_numpy(), atol=1e-6
    )


def test_a_failed_predict_leaves_no_marker_and_no_files(
    champion, mlflow_server, tiny_logs, s3, tmp_path
):
    """Pages of a column that cannot be decoded: the footers pass the checks, the read
    fails midway, and the output holds nothing a reader could take for a result."""
    logs = tmp_path / "logs"
    shutil.copytree(tiny_logs, logs)
    corrupt_column_pages(sorted(logs.glob("*.parquet"))[-1], "position")
    out = s3.uri("scores", "failed")
    result = _predict(mlflow_server, "--model", champion, "--input", str(logs), "--output", out)
    assert result.exit_code == 2, result.output
    bad = sorted(logs.glob("*.parquet"))[-1]
    assert f"error: {bad}: corrupt Parquet data, cannot read it (" in result.stderr
    fs = s3_fs()
    left = fs.get_file_info(
        pafs.FileSelector(out.removeprefix("s3://"), allow_not_found=True, recursive=True)
    )
    assert not [i.path for i in left if i.type == pafs.FileType.File], left


def _copy_with(tiny_logs: Path, target: Path, change) -> Path:
    table = pq.read_table(next(iter(sorted(Path(tiny_logs).glob("*.parquet")))))
    target.mkdir()
    pq.write_table(change(table), target / "part.parquet")
    return target / "part.parquet"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.drop_columns(["position"]), "column 'position' (dense feature"),
        (
            lambda t: t.set_column(
                t.schema.get_field_index("position"),
                "position",
                pa.array([str(v) for v in t["position"].to_pylist()]),
            ),
            "column 'position' (dense feature (standardize)) has type string",
        ),
        (lambda t: t.drop_columns(["event_id"]), "column 'event_id' (passthrough column)"),
    ],
    ids=["missing-feature", "wrong-type", "missing-passthrough"],
)
def test_wrong_schema_fails_early_and_writes_nothing(
    champion, mlflow_server, tiny_logs, tmp_path, change, message
) -> None:
    bad = _copy_with(tiny_logs, tmp_path / "bad", change)
    out = tmp_path / "scores"
    result = _predict(
        mlflow_server,
        *("--model", champion, "--input", str(bad.parent), "--output", str(out)),
        *("--passthrough", "event_id"),
    )
    assert result.exit_code == 2, result.output
    assert f"error: {bad}: {message}" in result.stderr
    assert not out.exists()


def test_output_must_be_new_and_model_must_exist(champion, mlflow_server, tiny_logs, tmp_path):
    out = tmp_path / "scores"
    out.mkdir()
    (out / "old.parquet").write_bytes(b"")
    used = _predict(
        mlflow_server, "--model", champion, "--input", str(tiny_logs), "--output", str(out)
    )
    assert used.exit_code == 2 and "folder is not empty" in used.stderr
    missing = _predict(
        mlflow_server,
        *(
            "--model",
            f"models:/{NAME}@nope",
            "--input",
            str(tiny_logs),
            "--output",
            str(tmp_path / "x"),
        ),
    )
    assert missing.exit_code == 2 and f"--model models:/{NAME}@nope: not found" in missing.stderr
    assert not (tmp_path / "x").exists()


def _wait_until_serving(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mlflow models serve exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"mlflow models serve did not answer in 180 s: {log.read_text()[-3000:]}")


def _post(url: str, rows: pd.DataFrame) -> tuple[int, str]:
    body = json.dumps({"dataframe_records": json.loads(rows.to_json(orient="records"))})
    request = urllib.request.Request(
        f"{url}/invocations", body.encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_rest_serving_answers_raw_rows_like_predict(
    champion, mlflow_server, tiny_logs, tmp_path
) -> None:
    """`mlflow models serve` of the alias on 127.0.0.1 (docs/registry.md, "REST serving")."""
    day = sorted(Path(tiny_logs).glob("*.parquet"))[0]
    out = tmp_path / "scores"
    result = _predict(
        mlflow_server,
        *("--model", champion, "--input", str(day), "--output", str(out)),
        *("--passthrough", "event_id"),
    )
    assert result.exit_code == 0, result.output
    batch = pd.read_parquet(out).set_index("event_id")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    # MLflow starts `uvicorn` by name: the environment's scripts must be on PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PATH": path}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", champion]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as sink:
        server = subprocess.Popen(
            command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_until_serving(url, server, log)
        rows = pd.read_parquet(day)  # raw rows: every column of the log, labels included
        status, body = _post(url, rows)
        assert status == 200, body
        served = pd.DataFrame(json.loads(body)["predictions"], index=rows["event_id"])
        assert len(served) == len(rows) == len(batch)
        for task in TASKS:
            np.testing.assert_allclose(served[task], batch.loc[served.index, task], atol=1e-6)

        status, body = _post(url, rows.drop(columns=["position"]).head(3))
        assert 400 <= status < 500, body
        assert "position" in json.loads(body)["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
