"""Config validation: clear errors for bad data sections, overrides, the checked-in configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import apply_overrides, load_config, parse_config
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _raw(**data_overrides) -> dict:
    data = {
        "path": "data/logs",
        "categorical": [{"column": "user_id", "buckets": 100}],
        "dense": [{"column": "price"}],
        "tasks": [{"name": "click"}],
    }
    data.update(data_overrides)
    return {"data": data}


def test_minimal_config_gets_defaults() -> None:
    cfg = parse_config(_raw())
    assert cfg.data.split.method == "hash"
    assert cfg.data.batch_size == 512
    assert cfg.data.dense[0].transform == "standardize"
    assert cfg.data.tasks[0].label_column == "click"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"data": {"path": "x", "categorical": [{"column": "a"}]}}, "data.tasks: Field required"),
        (_raw(colour="red"), "data.colour: Extra inputs are not permitted"),
        (_raw(tasks=[]), "data.tasks: List should have at least 1 item"),
        (_raw(categorical=[], dense=[]), "give at least one feature"),
        (_raw(tasks=[{"name": "a"}, {"name": "a"}]), "task names must be unique"),
        (_raw(tasks=[{"name": "user_id"}]), "['user_id'] are also listed as features"),
        (_raw(tasks=[{"name": "t", "type": "ranking"}]), "data.tasks.0.type"),
        (_raw(dense=[{"column": "p", "transform": "sqrt"}]), "data.dense.0.transform"),
        (_raw(categorical=[{"column": "u", "buckets": 0}]), "data.categorical.0.buckets"),
        (_raw(split={"validation_fraction": 0.6, "test_fraction": 0.5}), "must be below 1"),
        (_raw(split={"method": "values", "column": "s"}), "validation_values: required"),
        (_raw(split={"method": "cutoff", "column": "day"}), "validation_from: required"),
        (_raw(split={"method": "random"}), "data.split.method"),
        ({**_raw(), "train": {"threads_per_worker": 0}}, "train.threads_per_worker"),
        (
            _raw(tasks=[{"name": "w", "type": "regression", "group_column": "user_id"}]),
            "GAUC is a metric of binary tasks",
        ),
        (_raw(tasks=[{"name": "click"}], group_column="click"), "used as group_column"),
        (
            {**_raw(), "train": {"early_stopping": {"metric": "val/mean_gauc"}}},
            "with a group_column, also val/mean_gauc",
        ),
    ],
)
def test_invalid_configs_name_the_field(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(raw, source="my.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("my.yaml: ")


def test_gauc_metrics_need_a_group_column() -> None:
    raw = _raw(
        tasks=[{"name": "click"}, {"name": "like", "group_column": "viewer"}, {"name": "t"}],
        group_column="user_id",
    )
    raw["train"] = {"early_stopping": {"metric": "val/mean_gauc"}}
    data = parse_config(raw).data
    assert [t.group_column for t in data.tasks] == ["user_id", "viewer", "user_id"]
    assert data.group_columns == ["user_id", "viewer"]
    assert data.columns() == ["user_id", "price", "click", "like", "t", "viewer"]
    raw["train"] = {"early_stopping": {"metric": "val/like/gauc"}}
    assert parse_config(raw).train.early_stopping.metric == "val/like/gauc"


def test_overrides_parse_yaml_values() -> None:
    raw = apply_overrides(_raw(), ["data.batch_size=2048", "data.split.method=cutoff"])
    assert raw["data"]["batch_size"] == 2048
    with pytest.raises(ConfigError, match="validation_from: required"):
        parse_config(raw)
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides(_raw(), ["data.batch_size"])


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    # One line, as compilers write it: file:line:column: problem.
    assert str(err.value) == f"{bad}:2:1: expected ',' or ']', but got '<stream end>'"


@pytest.mark.parametrize("name", ["synthetic.yaml", "census.yaml"])
def test_checked_in_configs_are_valid(name: str) -> None:
    cfg = load_config(ROOT / "configs" / name)
    assert len(cfg.data.tasks) >= 3
    features = set(cfg.data.feature_columns)
    assert not features & {t.label_column for t in cfg.data.tasks}
    assert not features & {t.oracle for t in cfg.data.tasks if t.oracle}


def test_the_early_stopping_direction_follows_the_metric() -> None:
    """The direction of `train.early_stopping` comes from `pipeline.metrics_vocab`: a stated
    mode that contradicts the metric is an error naming the field (b69f646 kept 'max' for
    val/mean_ne and selected the worst epoch); one that agrees still loads."""
    raw = _raw()
    raw["train"] = {"early_stopping": {"metric": "val/mean_ne", "mode": "max"}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, source="my.yaml")
    assert str(err.value).startswith("my.yaml: train.early_stopping.mode: ")
    assert "'max' contradicts val/mean_ne" in str(err.value)
    raw["train"]["early_stopping"]["mode"] = "min"
    assert parse_config(raw).train.early_stopping.mode == "min"
    raw["train"]["early_stopping"] = {"metric": "val/click/auc", "mode": "max"}
    assert parse_config(raw).train.early_stopping.metric == "val/click/auc"
    raw["train"]["early_stopping"] = {"metric": "val/click/logloss", "mode": "max"}
    with pytest.raises(ConfigError, match="train.early_stopping.mode: .*'min'"):
        parse_config(raw)


def test_a_stored_config_with_a_contradicting_mode_is_upgraded() -> None:
    """A checkpoint's config written by an earlier version (mode max on val/mean_ne, its
    default) still resumes: the mode is dropped, with a line saying so."""
    from pipeline.config import upgrade_stored_config

    raw = _raw()
    raw["train"] = {"early_stopping": {"metric": "val/mean_ne", "mode": "max", "patience": 2}}
    upgraded, notes = upgrade_stored_config(raw)
    assert upgraded["train"]["early_stopping"] == {"metric": "val/mean_ne", "patience": 2}
    assert raw["train"]["early_stopping"]["mode"] == "max"  # the input is left alone
    assert notes == [
        "train.early_stopping.mode 'max' contradicts val/mean_ne (an earlier version "
        "selected the worst epoch by it); the run goes on by 'min'"
    ]
    assert parse_config(upgraded).train.early_stopping.patience == 2
    agreeing = _raw()
    agreeing["train"] = {"early_stopping": {"metric": "val/mean_auc", "mode": "max"}}
    assert upgrade_stored_config(agreeing) == (agreeing, [])


def test_reading_a_config_does_not_import_torch_dynamo() -> None:
    """The model check builds on the meta device without initialising: `nn.init.normal_`'s
    meta decomposition imported torch._dynamo, 1.1 s of every command that reads a config."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pipeline.config import load_config\n"
        "for name in ('synthetic', 'census'):\n"
        "    load_config(f'configs/{name}.yaml', [])\n"
        "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
