"""build_model: every name builds and learns; invalid configs raise ValueErrors naming the field."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models import CategoricalInput, FeatureSchema, ModelConfig, build_model
from models.adatt import AdaTT
from models.baselines import CrossStitch, SharedBottom, SingleTask
from models.builder import build_on_meta
from models.mmoe import MLMMoE
from models.ple import PLE

SCHEMA = FeatureSchema(num_dense=8, tasks=("a", "b", "c"))
NAMES = [
    "adatt",
    "adatt_sp",
    "mmoe",
    "ml_mmoe",
    "ple",
    "cross_stitch",
    "shared_bottom",
    "single_task",
]


def _toy_problem(n: int = 256):
    torch.manual_seed(0)
    x = torch.randn(n, 8)
    labels = torch.stack([x[:, 0] > 0, x[:, 1] * x[:, 2] > 0, x[:, :4].sum(1) > 0.5], dim=1)
    return {"dense": x}, labels.float()


@pytest.mark.parametrize("name", NAMES)
def test_every_model_reduces_the_loss(name):
    torch.manual_seed(1)
    model = build_model(
        {"name": name, "experts_per_task": [1, 2, 2], "expert_dims": [16, 8], "tower_dims": [8]},
        SCHEMA,
    )
    features, labels = _toy_problem()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        logits = model(features)
        assert logits.shape == (256, 3)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses[::10]


def test_names_map_to_backbones():
    kinds = {
        "adatt": AdaTT,
        "adatt_sp": AdaTT,
        "mmoe": MLMMoE,
        "ml_mmoe": MLMMoE,
        "ple": PLE,
        "cross_stitch": CrossStitch,
        "shared_bottom": SharedBottom,
        "single_task": SingleTask,
    }
    for name, kind in kinds.items():
        assert isinstance(build_model({"name": name}, SCHEMA).backbone, kind)


def test_issue_example_config():
    config = {
        "name": "adatt",
        "fusion_levels": 2,
        "experts_per_task": 2,
        "shared_experts": 1,
        "expert_dims": [128, 64],
        "tower_dims": [32],
    }
    model = build_model(config, SCHEMA)
    assert [level.num_experts for level in model.backbone.levels] == [7, 7]
    assert [level.output_dim for level in model.backbone.levels] == [128, 64]
    assert isinstance(model.model_config, ModelConfig) and model.schema is SCHEMA
    assert model.model_config.model_dump()["expert_dims"] == [128, 64]


def test_adatt_sp_forces_no_shared_unit_and_equals_adatt_with_zero_shared():
    torch.manual_seed(0)
    sp = build_model({"name": "adatt_sp", "shared_experts": 3}, SCHEMA)
    torch.manual_seed(0)
    general = build_model({"name": "adatt", "shared_experts": 0}, SCHEMA)
    assert sp.backbone.experts_per_unit == [2, 2, 2]
    assert sp.state_dict().keys() == general.state_dict().keys()
    features, _ = _toy_problem(16)
    torch.testing.assert_close(sp(features), general(features))


def test_mmoe_default_expert_budget_matches_adatt():
    model = build_model(
        {"name": "mmoe", "experts_per_task": [1, 2, 3], "shared_experts": 2}, SCHEMA
    )
    assert model.backbone.num_experts == 8
    assert len(model.backbone.levels) == 1  # MMoE: one gated level, experts of all widths
    assert [layer.out_features for layer in model.backbone.levels[0].layers] == [128, 64]
    model = build_model({"name": "ml_mmoe", "num_experts": 5}, SCHEMA)
    assert model.backbone.num_experts == 5 and len(model.backbone.levels) == 2


def test_callers_lists_are_not_mutated():
    config = {
        "name": "adatt",
        "experts_per_task": [1, 2, 3],
        "expert_dims": [[16, 8], 4],
        "tower_dims": [],
    }
    before = copy.deepcopy(config)
    model = build_model(config, SCHEMA)
    model(_toy_problem(4)[0]).sum().backward()
    assert config == before
    validated = ModelConfig(**config)
    build_model(validated, SCHEMA)
    assert validated.experts_per_task == [1, 2, 3] and validated.expert_dims == [[16, 8], 4]


@pytest.mark.parametrize(
    ("config", "schema", "field"),
    [
        ({"name": "adatt"}, FeatureSchema(num_dense=4), "tasks"),
        ({"experts_per_task": 0}, SCHEMA, "experts_per_task"),
        ({"experts_per_task": [2, 0, 1]}, SCHEMA, "experts_per_task"),
        ({"experts_per_task": [2, 2]}, SCHEMA, "experts_per_task"),
        ({"shared_experts": -1}, SCHEMA, "shared_experts"),
        ({"name": "mmoe", "num_experts": 0}, SCHEMA, "num_experts"),
        ({"expert_dims": [64, 0]}, SCHEMA, "expert_dims"),
        ({"expert_dims": [[64, -2]]}, SCHEMA, "expert_dims"),
        ({"expert_dims": []}, SCHEMA, "expert_dims"),
        ({"expert_dims": [[]]}, SCHEMA, "expert_dims"),
        ({"tower_dims": [0]}, SCHEMA, "tower_dims"),
        ({"fusion_levels": 3, "expert_dims": [8, 4]}, SCHEMA, "fusion_levels"),
        ({"name": "transformer"}, SCHEMA, "name"),
        ({"experts": 2}, SCHEMA, "experts"),
        ({"activation": "swish"}, SCHEMA, "activation"),
    ],
)
def test_invalid_configs_raise_value_errors_naming_the_field(config, schema, field):
    with pytest.raises(ValueError, match=field):
        build_model(config, schema)
    with pytest.raises(ValueError, match=field):  # the config check says the same
        build_on_meta(config, schema)


def test_build_on_meta_allocates_nothing_and_leaves_later_models_initialised():
    huge = FeatureSchema(
        num_dense=4, categorical=(CategoricalInput("c", 10**9, 64),), tasks=("a", "b")
    )
    build_on_meta({"name": "adatt"}, huge)  # 256 GB of table on a real device
    model = build_model({"name": "adatt"}, SCHEMA)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert weights.device.type == "cpu" and 0.05 < float(weights.std()) < 1.0
