"""Bad input to `adatt train`: one line naming the file, column or config field, exit code 2,
before Ray starts, and nothing written (MLflow store byte-identical, no checkpoint folder,
input files untouched). No Ray here: `start_ray` is replaced by a tripwire."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipeline import session
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.data.fit import fit_preprocessor
from pipeline.datasets.synthetic import generate_logs
from pipeline.training.checks import check_before_ray
from tests.conftest import REPO_ROOT, corrupt_column_pages, free_port

CONFIG = REPO_ROOT / "configs" / "synthetic.yaml"
TRAIN_DAY = "2024-01-05.parquet"
VALIDATION_DAY = "2024-01-13.parquet"


@pytest.fixture(scope="module")
def good_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("good_logs")
    generate_logs(out, rows=700, seed=0)
    return out


@pytest.fixture(scope="module")
def store_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An MLflow store that already holds a finished run and a registered model."""
    folder = tmp_path_factory.mktemp("store")
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    run = client.create_run(client.create_experiment("adatt"))
    client.set_terminated(run.info.run_id, "FINISHED")
    client.create_registered_model("adatt")
    return folder / "mlflow.db", run.info.run_id


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def tripwire(*args: object) -> None:
        raise AssertionError("Ray was started before the input checks finished")

    monkeypatch.setattr(session, "start_ray", tripwire)


def _digest(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


def _rewrite(path: Path, change: Callable[[pa.Table], pa.Table], **write_options) -> None:
    pq.write_table(change(pq.read_table(path)), path, **write_options)


def _set(table: pa.Table, column: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(column), column, values)


def _with_value(table: pa.Table, column: str, row: int, value: float) -> pa.Table:
    values = table[column].to_numpy().astype(np.float64)
    values[row] = value
    return _set(table, column, pa.array(values).cast(table.schema.field(column).type))


# Each case: (prepare(data folder) -> data.path to use, extra --set, message fragments).
# `{f}` in a fragment is replaced by the changed file's path.
def _drop(column: str) -> Callable[[Path], str]:
    def prepare(logs: Path) -> str:
        _rewrite(logs / TRAIN_DAY, lambda t: t.drop_columns([column]))
        return str(logs)

    return prepare


def _string_position(logs: Path) -> str:
    _rewrite(logs / TRAIN_DAY, lambda t: _set(t, "position", pc.cast(t["position"], pa.string())))
    return str(logs)


def _truncated(logs: Path) -> str:
    raw = (logs / TRAIN_DAY).read_bytes()
    (logs / TRAIN_DAY).write_bytes(raw[: len(raw) // 2])
    return str(logs)


def _corrupt_pages(logs: Path) -> str:
    corrupt_column_pages(logs / TRAIN_DAY, "position")
    return str(logs)


def _csv_named_parquet(logs: Path) -> str:
    (logs / "extra.parquet").write_text("user_id,click\n1,0\n")
    return str(logs)


def _csv_file(logs: Path) -> str:
    (logs / "logs.csv").write_text("user_id,click\n1,0\n")
    return str(logs / "logs.csv")


def _empty_folder(logs: Path) -> str:
    (logs / "empty").mkdir()
    return str(logs / "empty")


def _drift(logs: Path) -> str:
    _rewrite(logs / TRAIN_DAY, lambda t: _set(t, "hour", pc.cast(t["hour"], pa.string())))
    return str(logs)


def _share_all_null(write_statistics: bool) -> Callable[[Path], str]:
    def prepare(logs: Path) -> str:
        for file in logs.glob("*.parquet"):
            _rewrite(
                file,
                lambda t: _set(t, "share", pa.nulls(t.num_rows, pa.int8())),
                write_statistics=write_statistics,
            )
        return str(logs)

    return prepare


def _bad_dense(file: str, value: float) -> Callable[[Path], str]:
    def prepare(logs: Path) -> str:
        _rewrite(logs / file, lambda t: _with_value(t, "item_age_hours", 3, value))
        return str(logs)

    return prepare


def _click_two(write_statistics: bool) -> Callable[[Path], str]:
    def prepare(logs: Path) -> str:
        _rewrite(
            logs / TRAIN_DAY,
            lambda t: _with_value(t, "click", 0, 2),
            write_statistics=write_statistics,
        )
        return str(logs)

    return prepare


def _float_ids_with_nan(logs: Path) -> str:
    def change(t: pa.Table) -> pa.Table:
        ids = t["user_id"].to_numpy().astype(np.float64)
        ids[0] = np.nan
        return _set(t, "user_id", pa.array(ids))

    _rewrite(logs / TRAIN_DAY, change)
    return str(logs)


def _logs(logs: Path) -> str:
    return str(logs)


CASES = {
    "missing label column": (
        _drop("like"),
        [],
        ["{f}: column 'like' (binary label of task 'like') not found"],
    ),
    "missing feature column": (
        _drop("item_age_hours"),
        [],
        ["{f}: column 'item_age_hours' (dense feature (log1p)) not found"],
    ),
    "string where a number is expected": (
        _string_position,
        [],
        ["{f}: column 'position' (dense feature (standardize)) has type string; expected a number"],
    ),
    "truncated Parquet file among good ones": (
        _truncated,
        [],
        ["{f}: not a Parquet file, or truncated"],
    ),
    "corrupt column pages, footer intact": (
        _corrupt_pages,
        [],
        ["{f}: corrupt Parquet data, cannot read it"],
    ),
    "non-Parquet file named .parquet": (
        _csv_named_parquet,
        [],
        ["extra.parquet: not a Parquet file, or truncated"],
    ),
    "non-Parquet file as data.path": (_csv_file, [], ["logs.csv: not a Parquet file"]),
    "empty input folder": (_empty_folder, [], ["empty: folder holds no Parquet files"]),
    "schema drift between files": (
        _drift,
        [],
        ["{f}: schema drift: column 'hour' is string here but int16 in", "2024-01-01"],
    ),
    "label column entirely null": (
        _share_all_null(True),
        [],
        ["column 'share' (label of task 'share') is null in all 700 rows"],
    ),
    "label column entirely null, no footer statistics": (
        _share_all_null(False),
        [],
        ["column 'share' (label of task 'share') is null in all 700 rows"],
    ),
    "NaN in a dense feature (validation rows)": (
        _bad_dense(VALIDATION_DAY, float("nan")),
        [],
        ["{f}: column 'item_age_hours' (dense feature) has 1 null/NaN/inf value(s)"],
    ),
    "inf in a dense feature (train rows)": (
        _bad_dense(TRAIN_DAY, float("inf")),
        [],
        ["{f}: column 'item_age_hours' (dense feature) has 1 null/NaN/inf value(s)"],
    ),
    "binary label outside {0, 1}": (
        _click_two(True),
        [],
        ["{f}: column 'click' (binary label of task 'click') has values in [0, 2]"],
    ),
    "binary label outside {0, 1}, no footer statistics": (
        _click_two(False),
        [],
        ["{f}: column 'click' (binary label of task 'click') has values [2.0]"],
    ),
    "unknown config field": (_logs, ["train.epocs=3"], ["train.epocs: Extra inputs"]),
    "invalid config value": (_logs, ["train.lr=-1"], ["train.lr: Input should be greater than 0"]),
    "float categorical column holding NaN": (
        _float_ids_with_nan,
        [],
        [
            "{f}: column 'user_id' (categorical feature) has type double; expected an "
            "integer, string or bool"
        ],
    ),
    "per-task list against the number of tasks": (
        _logs,
        ["model.experts_per_task=[1,2]"],
        ["synthetic.yaml: model.experts_per_task has 2 entries but there are 4 tasks"],
    ),
    "early-stopping metric of no task": (
        _logs,
        ["train.early_stopping.metric=val/clik/auc"],
        ["train.early_stopping.metric: 'val/clik/auc' is not a validation metric of tasks"],
    ),
    "override that is not YAML": (
        _logs,
        ["model.expert_dims=[16,"],
        ["override 'model.expert_dims=[16,': not valid YAML: 1:5: expected the node content"],
    ),
    "credentials in a URI": (
        _logs,
        ["train.storage_path=s3://AKIAFAKE:fake-secret-value@bucket/runs"],
        ["train.storage_path: the URI holds credentials"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    case: str, good_logs: Path, store_template: tuple[Path, str], tmp_path: Path, no_ray
) -> None:
    prepare, sets, fragments = CASES[case]
    logs = tmp_path / "logs"
    shutil.copytree(good_logs, logs)
    data_path = prepare(logs)
    store = tmp_path / "store" / "mlflow.db"
    store.parent.mkdir()
    shutil.copy(store_template[0], store)
    inputs = sorted(logs.rglob("*"))
    before = _digest([store, *inputs])

    result = CliRunner().invoke(
        app,
        [
            "train",
            "-c",
            str(CONFIG),
            "--set",
            f"data.path={data_path}",
            "--set",
            f"tracking.tracking_uri=sqlite:///{store}",
            "--set",
            f"train.storage_path={tmp_path}/runs",
            *[arg for item in sets for arg in ("--set", item)],
        ],
    )

    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    changed = str(logs / TRAIN_DAY if "validation" not in case else logs / VALIDATION_DAY)
    for fragment in fragments:
        assert fragment.replace("{f}", changed) in lines[0]
    assert "fake-secret-value" not in result.output
    assert _digest([store, *inputs]) == before  # store and inputs byte-identical
    assert sorted(logs.rglob("*")) == inputs
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", ["label column entirely null", "missing label column"])
def test_bad_input_creates_no_store_where_there_was_none(
    case: str, good_logs: Path, tmp_path: Path, no_ray
) -> None:
    """Refused before anything is written: no `mlflow.db` appears where none was (b69f646
    created the store with MLflow's tables before the row check refused the data)."""
    prepare, sets, _ = CASES[case]
    logs = tmp_path / "logs"
    shutil.copytree(good_logs, logs)
    data_path = prepare(logs)
    empty = tmp_path / "empty"
    empty.mkdir()
    sets = [f"data.path={data_path}", f"tracking.tracking_uri=sqlite:///{empty}/mlflow.db", *sets]
    result = CliRunner().invoke(
        app, ["train", "-c", str(CONFIG), *[arg for item in sets for arg in ("--set", item)]]
    )
    assert result.exit_code == 2, result.output
    assert list(empty.iterdir()) == []


def test_yaml_syntax_error_is_file_line_column(
    good_logs: Path, store_template: tuple[Path, str], tmp_path: Path, no_ray
) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text(CONFIG.read_text().replace("  batch_size:", "  batch_size: [", 1))
    store = tmp_path / "mlflow.db"
    shutil.copy(store_template[0], store)
    before = _digest([store])
    result = _invoke(
        tmp_path,
        "--set",
        f"tracking.tracking_uri=sqlite:///{store}",
        config=config,
    )
    assert result.exit_code == 2, result.output
    lines = config.read_text().splitlines()
    at = next(i for i, text in enumerate(lines) if "batch_size: [" in text) + 1  # 0-based
    column = lines[at].index(":")  # the next key's ':' ends the unclosed flow sequence
    assert result.stderr.splitlines() == [
        f"error: {config}:{at + 1}:{column + 1}: expected ',' or ']', but got ':'"
    ]
    assert _digest([store]) == before
    assert not (tmp_path / "runs").exists()


def _invoke(tmp_path: Path, *args: str, env: dict[str, str] | None = None, config: Path = CONFIG):
    return CliRunner().invoke(
        app,
        [
            "train",
            "-c",
            str(config),
            "--set",
            f"train.storage_path={tmp_path}/runs",
            *args,
        ],
        env=env,
    )


def test_unreachable_tracking_server_fails_fast(good_logs: Path, tmp_path: Path, no_ray) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    result = _invoke(
        tmp_path, "--set", f"data.path={good_logs}", "--set", f"tracking.tracking_uri={uri}"
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: tracking.tracking_uri: MLflow server {uri} is unreachable "
        "([Errno 111] Connection refused); start it or fix the URI"
    )
    assert not (tmp_path / "runs").exists()


def test_malformed_fault_hook_and_finished_resume_fail_fast(
    good_logs: Path, store_template: tuple[Path, str], tmp_path: Path, no_ray
) -> None:
    store = tmp_path / "mlflow.db"
    shutil.copy(store_template[0], store)
    common = [
        "--set",
        f"data.path={good_logs}",
        "--set",
        f"tracking.tracking_uri=sqlite:///{store}",
    ]
    before = _digest([store])
    result = _invoke(tmp_path, *common, env={"ADATT_FAULT": "boom@2"})
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ADATT_FAULT='boom@2': expected <raise|exit|hang|nan>@")
    result = _invoke(tmp_path, *common, "--resume", store_template[1])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: --resume {store_template[1]}: the run already FINISHED; nothing to resume"
    )
    assert _digest([store]) == before
    assert not (tmp_path / "runs").exists()


def test_impute_lets_nan_through_when_the_config_says_so(good_logs: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    shutil.copytree(good_logs, logs)
    _bad_dense(TRAIN_DAY, float("nan"))(logs)
    raw = yaml.safe_load(CONFIG.read_text())
    for feature in raw["data"]["dense"]:
        if feature["column"] == "item_age_hours":
            feature["impute"] = 0.0
    path = tmp_path / "impute.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(
        path, [f"data.path={logs}", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db"]
    )
    files = check_before_ray(config)
    stats = fit_preprocessor(config.data, files).dense_stats["item_age_hours"]
    train_files = [f for f in sorted(good_logs.glob("*.parquet")) if f.name < VALIDATION_DAY]
    columns = [pq.read_table(f)["item_age_hours"].to_numpy().copy() for f in train_files]
    columns[[f.name for f in train_files].index(TRAIN_DAY)][3] = 0.0  # the NaN, imputed
    train = np.concatenate(columns).astype(np.float64)
    logged = np.sign(train) * np.log1p(np.abs(train))
    assert stats.count == len(train)
    assert stats.mean == pytest.approx(logged.mean(), rel=1e-9)
