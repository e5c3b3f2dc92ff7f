"""`adatt train --warm-start`: a new run from a registered model, against a real MLflow server.

The parent is the session's shared 2-epoch training on the tiny logs (`served_training`); the
next day's logs are new rows of the same synthetic world.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import parse_config
from pipeline.data.preprocess import DenseStats, Preprocessor
from pipeline.errors import InputError
from pipeline.modelfile.store import read_model, resolve_model
from pipeline.release.registry import register_run
from pipeline.tracking import tags
from pipeline.training.driver import run_training
from pipeline.training.losses import build_training_model
from pipeline.training.warm_start import (
    WarmStart,
    check_schema_matches,
    fit_weights,
    resolve_warm_start,
)
from tests.conftest import registry_client, tiny_config

NEXT_DAY = "2024-01-15"  # the tiny logs hold 2024-01-01 .. 2024-01-14


def _spec(config) -> dict:
    return {
        "model": config.model.model_dump(mode="json"),
        "preprocessor": Preprocessor(config.data).to_dict(),
    }


def _changed(config, edit) -> object:
    """`config` with `edit` applied to its JSON form."""
    raw = config.model_dump(mode="json")
    edit(raw)
    return parse_config(raw)


def test_a_changed_schema_or_network_names_the_field(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, tmp_path)
    spec = _spec(config)
    check_schema_matches(spec, config, "models:/m@champion")  # the same: no error
    # How a task is trained or evaluated is not schema: loss weight, GAUC groups.
    retuned = _changed(
        config,
        lambda raw: (
            raw["data"]["tasks"][3].update(weight=0.5),
            raw["data"].update(group_column=None),
        ),
    )
    check_schema_matches(spec, retuned, "models:/m@champion")
    wider = _changed(config, lambda raw: raw["data"]["categorical"][1].update(buckets=60000))
    with pytest.raises(InputError) as err:
        check_schema_matches(spec, wider, "models:/m@champion")
    assert str(err.value) == (
        "--warm-start models:/m@champion: the data schema changed: data.categorical[1].buckets "
        "is 50000 in the model, 60000 in the config; a warm start needs the model's feature "
        "columns, buckets, transforms and tasks"
    )
    renamed = _changed(config, lambda raw: raw["data"]["tasks"][0].update(label="clicked"))
    with pytest.raises(InputError, match=r"data.tasks\[0\].label is 'click' in the model"):
        check_schema_matches(spec, renamed, "s")

    from models import build_model

    weights = build_model(config.model, config.data.feature_schema()).state_dict()
    assert fit_weights(weights, spec, config, "s").keys() == weights.keys()
    deeper = tiny_config(tmp_path, tmp_path, "model.expert_dims=[32, 8]")
    with pytest.raises(InputError, match=r"model.expert_dims\[0\] is 16 in the model, 32 in"):
        fit_weights(weights, spec, deeper, "s")


BEFORE_FIDELITY = Path(__file__).resolve().parents[2] / "fixtures" / "before-fidelity"


@pytest.mark.parametrize(
    ("name", "upgrade"),
    [
        ("adatt", "filled in backbone.levels.0.native_weights.4 = [1.0]"),
        (
            "ple",
            "converted backbone.levels.0.gates.weight, backbone.levels.0.gates.bias, "
            "backbone.levels.1.gates.weight, backbone.levels.1.gates.bias to this version's "
            "layout",
        ),
    ],
)
def test_models_logged_before_the_fidelity_fix_warm_start(
    name: str, upgrade: str, tmp_path: Path, capsys
) -> None:
    """Models that an earlier release logged (`tests/fixtures/before-fidelity/make.py`, run in
    a worktree of eedafcf) warm-start a run: AdaTT without v for its one-expert shared unit
    (it trained with v = 1), PLE with the full gate layout. One line says what was filled in
    or converted; the weights then score the rows as `adatt predict` does (b69f646 refused
    both: `parameter 'backbone.levels.0.native_weights.4' is None in the model`)."""
    import torch
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("adatt")
    run = client.create_run(experiment)
    logged = client.create_logged_model(experiment, name="model", source_run_id=run.info.run_id)
    client.log_model_artifacts(logged.model_id, str(BEFORE_FIDELITY / name))
    source = f"models:/{logged.model_id}"
    model = read_model(resolve_model(source, client), client)
    config = parse_config(
        {"data": model.spec["preprocessor"]["data"], "model": model.spec["model"]}
    )

    parent = resolve_warm_start(source, client, config)

    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: --warm-start {source}: weights in an earlier version's layout, upgraded: {upgrade}"
    ]
    assert parent.weights.keys() != model.weights.keys() or any(
        parent.weights[k].shape != v.shape for k, v in model.weights.items()
    )
    training = build_training_model(config)
    training.model.load_state_dict(parent.weights)  # strict, as a worker loads it
    raw = pq.read_table(BEFORE_FIDELITY / "rows.parquet")
    rows = model.preprocessor().transform(raw, with_labels=False)
    batch = {k: torch.from_numpy(v) for k, v in rows.items()}
    with torch.no_grad():
        predicted = model.network()(batch)  # what predict and evaluate score with
        warm = training.model.eval()(batch)
    assert torch.equal(predicted, warm)


def test_statistics_are_the_models_unless_refit(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, tmp_path)
    kept = {"position": DenseStats(3.0, 2.0, 10)}
    parent = WarmStart("s", "models:/m/1", "r", "m/1", {}, kept)
    fitted = Preprocessor(config.data, {"position": DenseStats(5.0, 1.0, 99)})
    assert parent.preprocessor(config, fitted, refit=False).dense_stats == kept
    assert parent.preprocessor(config, fitted, refit=True) is fitted


def test_sources_that_are_not_models_are_refused() -> None:
    with pytest.raises(InputError, match="expected models:/NAME@ALIAS, models:/NAME/VERSION"):
        resolve_warm_start("champion", None, None)
    with pytest.raises(InputError, match="--resume continues a run, --warm-start starts a new"):
        run_training(None, resume="abc", warm_start="models:/m@champion")


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_warm_start_on_the_next_day_beats_a_cold_start(
    served_training, mlflow_server, tmp_path_factory
) -> None:
    from pipeline.datasets.synthetic import generate_logs

    parent_config, parent = served_training
    client = registry_client(mlflow_server)
    register_run(client, parent.run_id, "warm-test", "champion")
    day = tmp_path_factory.mktemp("next-day")
    generate_logs(day, rows=3000, days=1, start_day=NEXT_DAY, seed=0)
    workdir = tmp_path_factory.mktemp("warm")
    overrides = [
        f"tracking.tracking_uri={mlflow_server}",
        "train.epochs=1",
        "data.split={method: hash, column: user_id, validation_fraction: 0.3}",
    ]
    config = tiny_config(day, workdir, *overrides)

    # A changed schema: one line naming the field, before Ray or MLflow writes anything.
    runs_before = len(client.search_runs([client.get_experiment_by_name("adatt").experiment_id]))
    wider = _changed(config, lambda raw: raw["data"]["categorical"][0].update(buckets=7))
    with pytest.raises(InputError, match=r"data.categorical\[0\].buckets is 100000 in the model"):
        run_training(wider, warm_start="models:/warm-test@champion")
    experiment = client.get_experiment_by_name("adatt").experiment_id
    assert len(client.search_runs([experiment])) == runs_before

    cold = run_training(config)
    warm = run_training(config, warm_start="models:/warm-test@champion")
    assert warm.run_id not in (parent.run_id, cold.run_id)
    # After one epoch on the day, the warm start is ahead on every binary task's loss.
    for task in ("click", "like", "share"):
        assert warm.metrics[f"best/val/{task}/logloss"] < cold.metrics[f"best/val/{task}/logloss"]
    assert warm.metrics["best/val/mean_ne"] < cold.metrics["best/val/mean_ne"]

    run_tags = client.get_run(warm.run_id).data.tags
    assert run_tags[tags.WARM_START] == "models:/warm-test@champion"
    assert run_tags[tags.PARENT_MODEL] == "models:/warm-test/1"
    assert run_tags[tags.PARENT_VERSION] == "warm-test/1"
    assert run_tags[tags.PARENT_RUN] == parent.run_id
    assert run_tags[tags.DATA_WINDOW] == f"files {NEXT_DAY}.parquet (1)"
    assert tags.WARM_START not in client.get_run(cold.run_id).data.tags
    # The dense statistics are the parent's (no --refit-stats), the cold run's its own.
    stats = {
        uri: read_model(resolve_model(uri, client), client).spec["preprocessor"]["dense_stats"]
        for uri in (parent.model_uri, warm.model_uri, cold.model_uri)
    }
    assert stats[warm.model_uri] == stats[parent.model_uri] != stats[cold.model_uri]
    assert parent_config.data.categorical == config.data.categorical


def test_data_window_is_the_cutoff_columns_range(tiny_logs: Path, tmp_path: Path) -> None:
    from pipeline.data.files import InputFiles
    from pipeline.training.warm_start import data_window

    config = tiny_config(tiny_logs, tmp_path)  # split by the `day` column (cutoff)
    files = InputFiles.read(sorted(str(p) for p in tiny_logs.glob("*.parquet")))
    assert data_window(files, config.data) == "day 2024-01-01..2024-01-14 (14 files)"
