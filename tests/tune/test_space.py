"""Search-space parsing and validation: every error names the field, before any trial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ray import tune

from pipeline.errors import ConfigError
from tests.conftest import REPO_ROOT
from tune.space import load_search_spec, parse_search_spec

BASE = str(REPO_ROOT / "configs" / "synthetic.yaml")


def spec_of(search: dict, tune_settings: dict | None = None, **extra):
    raw = {"base": BASE, "search": search, "tune": tune_settings or {}, **extra}
    return parse_search_spec(raw, "spec.yaml", REPO_ROOT / "configs", "test")


def test_repository_spec_loads_and_covers_the_design_space() -> None:
    spec = load_search_spec(REPO_ROOT / "configs" / "tune-synthetic.yaml")
    assert spec.name == "tune-synthetic"
    assert spec.base.train.epochs == 4
    # The depth is searched through expert_dims, so the base's fusion_levels is dropped.
    assert spec.base.model.fusion_levels is None
    assert {
        "model.expert_dims",
        "model.experts_per_task",
        "model.shared_experts",
        "train.lr",
        "data.batch_size",
        "train.weight_decay",
        "train.loss_weighting",
    } <= set(spec.space)
    assert spec.space["train.loss_weighting"].choice == [
        "fixed",
        "uncertainty",
        "upgrad",
        "pcgrad",
        "mgda",
        "imtl_g",
    ]
    assert spec.settings.searcher == "optuna" and spec.settings.num_samples == 16
    assert spec.default_values()["model.expert_dims"] == [64, 32]


def test_overrides_split_between_spec_and_base() -> None:
    spec = load_search_spec(
        REPO_ROOT / "configs" / "tune-synthetic.yaml",
        ["tune.num_samples=3", "train.epochs=2", "search.train.lr={uniform: [0.001, 0.002]}"],
    )
    assert spec.settings.num_samples == 3
    assert spec.base.train.epochs == 2
    assert spec.space["train.lr"].uniform == (0.001, 0.002)


def test_list_choices_round_trip_through_tune_as_text() -> None:
    spec = spec_of(
        {
            "model.expert_dims": {"choice": [[16], [16, 8, 4]]},
            "model.name": {"grid": ["adatt", "ple"]},
        }
    )
    space = spec.param_space()
    assert isinstance(space["model.expert_dims"], tune.search.sample.Categorical)
    assert space["model.expert_dims"].categories == ["[16]", "[16, 8, 4]"]
    assert space["model.name"] == {"grid_search": ["adatt", "ple"]}
    values = spec.decode({"model.expert_dims": "[16, 8, 4]", "model.name": "ple"})
    assert values == {"model.expert_dims": [16, 8, 4], "model.name": "ple"}
    config = spec.trial_config(values)
    assert config.model.levels == 3 and config.model.name == "ple"
    # The base is not changed by a trial.
    assert spec.base.model.expert_dims == [64, 32]


def test_ranges_become_tune_domains() -> None:
    spec = spec_of(
        {
            "train.lr": {"loguniform": [1e-4, 1e-2]},
            "model.shared_experts": {"randint": [0, 3]},
            "train.weight_decay": {"uniform": [0, 1e-4]},
        }
    )
    space = spec.param_space()
    assert (space["train.lr"].lower, space["train.lr"].upper) == (1e-4, 1e-2)
    assert (space["model.shared_experts"].lower, space["model.shared_experts"].upper) == (0, 3)
    assert spec.describe()["search.train.lr"] == "loguniform(0.0001, 0.01)"


@pytest.mark.parametrize(
    ("search", "settings", "message"),
    [
        (
            {"model.experts": {"choice": [1]}},
            {},
            "search.model.experts: model has no field 'experts'",
        ),
        ({"modle.name": {"choice": ["adatt"]}}, {}, "the config has no field 'modle'"),
        ({"model": {"choice": [1]}}, {}, "search.model: is a section"),
        ({"train.lr.x": {"choice": [1]}}, {}, "train.lr is not a section"),
        ({"data.path": {"choice": ["x"]}}, {}, "search.data.path: this field is fixed"),
        (
            {"train.num_workers": {"choice": [1, 2]}},
            {},
            "search.train.num_workers: this field is fixed",
        ),
        (
            {"model.name": {"choice": ["adatt", "transformer"]}},
            {},
            'search.model.name: value "transformer"',
        ),
        ({"model.shared_experts": {"grid": [0, -1]}}, {}, "search.model.shared_experts: value -1"),
        (
            {"model.experts_per_task": {"choice": [[1, 2]]}},
            {},
            "experts_per_task has 2 entries but there are 4 tasks",
        ),
        ({"train.lr": {"loguniform": [0, 1]}}, {}, "loguniform: bounds must be positive"),
        ({"train.lr": {"uniform": [0.1, 0.01]}}, {}, "low must be below high"),
        ({"train.lr": {"choice": [0.1], "grid": [0.2]}}, {}, "give exactly one of"),
        (
            {"train.lr": {"normal": [0, 1]}},
            {},
            "search.train.lr.normal: Extra inputs are not permitted",
        ),
        (
            {"train.lr": {"uniform": [0.1, 0.2]}},
            {"searcher": "grid"},
            "the grid searcher takes choice or grid",
        ),
        (
            {"train.lr": {"grid": [0.1, 0.2]}},
            {"searcher": "optuna"},
            "the optuna searcher cannot take a grid",
        ),
        ({"train.lr": {"grid": [0.1]}}, {"searcher": "bayes"}, "tune.searcher: Input should be"),
        (
            {"train.lr": {"grid": [0.1]}},
            {"metric": "test/mean_auc"},
            "tune.metric: Value error, trials report",
        ),
        (
            {"train.lr": {"grid": [0.1]}},
            {"scheduler": {"type": "asha", "reduction_factor": 1}},
            "tune.scheduler.reduction_factor",
        ),
        ({}, {}, "search: Dictionary should have at least 1 item"),
        (
            {"train.lr": {"grid": [0.1]}},
            {"metric": "val/mean_ne", "mode": "max"},
            "tune.mode: Value error, 'max' contradicts val/mean_ne",
        ),
    ],
)
def test_invalid_space_fails_naming_the_field(search, settings, message) -> None:
    with pytest.raises(ConfigError) as err:
        spec_of(search, settings)
    assert message in str(err.value)
    assert str(err.value).startswith("spec.yaml")


def test_unknown_top_level_key_and_missing_base(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="spec.yaml: serach: Extra inputs are not permitted"):
        parse_search_spec({"base": BASE, "serach": {}}, "spec.yaml", tmp_path, "x")
    with pytest.raises(ConfigError, match="base: training config .*nope.yaml not found"):
        spec_of({"train.lr": {"grid": [0.1]}}, base="nope.yaml")
    with pytest.raises(ConfigError, match="search spec not found"):
        load_search_spec(tmp_path / "missing.yaml")


def test_invalid_base_field_names_the_base(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"spec.yaml: base .*synthetic.yaml: train.lr: Input should be greater than 0",
    ):
        spec_of({"model.name": {"grid": ["adatt"]}}, set={"train.lr": -1})


def test_inline_base_mapping_and_fixed_fields(tmp_path: Path) -> None:
    import yaml

    base = yaml.safe_load(Path(BASE).read_text())
    path = tmp_path / "inline.yaml"
    path.write_text(
        json.dumps(
            {
                "base": base,
                "set": {"train.epochs": 2},
                "search": {"model.shared_experts": {"grid": [0, 1]}},
            }
        )
    )
    spec = load_search_spec(path)
    assert spec.name == "inline" and spec.base.train.epochs == 2
    # fusion_levels stays when the depth is not searched.
    assert spec.base.model.fusion_levels == 2
    assert spec.trial_config({"model.shared_experts": 0}).model.shared_experts == 0


def test_default_point_is_the_base_config_and_must_lie_in_the_space() -> None:
    search = {
        "model.expert_dims": {"choice": [[64], [64, 32]]},
        "train.lr": {"loguniform": [1e-4, 1e-2]},
    }
    spec = spec_of(search, {"include_default": True})
    assert spec.default_point() == {"model.expert_dims": "[64, 32]", "train.lr": 0.001}
    with pytest.raises(
        ConfigError, match=r"base config's train.lr = 0.001 is outside search.train.lr"
    ):
        spec_of({"train.lr": {"uniform": [0.01, 0.1]}}, {"include_default": True})
    with pytest.raises(ConfigError, match="include_default: takes the random or optuna searcher"):
        spec_of({"train.lr": {"grid": [0.001]}}, {"include_default": True})


def test_the_search_direction_follows_the_metric() -> None:
    """Tune's mode comes from the metric's direction (`pipeline.metrics_vocab`); a stated
    one must agree. Each trial's early stopping then selects the same way."""
    ne = spec_of({"train.lr": {"grid": [0.1]}}, {"metric": "val/mean_ne"})
    assert ne.settings.mode is None and ne.settings.direction == "min"
    stated = spec_of({"train.lr": {"grid": [0.1]}}, {"metric": "val/click/auc", "mode": "max"})
    assert stated.settings.direction == "max"
