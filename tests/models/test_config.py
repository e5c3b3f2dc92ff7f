"""ModelConfig and FeatureSchema: validation and the JSON-able schema round trip."""

from __future__ import annotations

import json

import pytest

from models.config import CategoricalInput, FeatureSchema, ModelConfig


def test_schema_round_trips_through_json():
    schema = FeatureSchema(
        categorical=(CategoricalInput("user", 100, 8),),
        num_dense=3,
        multi_hot=(CategoricalInput("history", 50, 4),),
        tasks=("click", "buy"),
    )
    data = json.loads(json.dumps(schema.to_dict()))
    assert data["categorical"] == [{"name": "user", "buckets": 100, "dim": 8}]
    assert FeatureSchema.from_dict(data) == schema
    with pytest.raises(ValueError, match="unknown"):
        FeatureSchema.from_dict({**data, "labels": []})


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: CategoricalInput("user", 0, 8), "buckets"),
        (lambda: CategoricalInput("user", 10, 0), "dim"),
        (lambda: FeatureSchema(num_dense=-1), "num_dense"),
        (lambda: FeatureSchema(tasks=("a", "a")), "tasks"),
        (lambda: FeatureSchema(categorical=(CategoricalInput("x", 2, 2),) * 2), "names"),
    ],
)
def test_schema_errors_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_model_config_levels_and_dims():
    config = ModelConfig(expert_dims=[[16, 8], 4])
    assert config.levels == 2 and config.level_dims() == [[16, 8], [4]]
    config.level_dims()[0].append(99)
    assert config.expert_dims == [[16, 8], 4]  # level_dims() is a copy
    assert ModelConfig(experts_per_task=[1, 2]).experts_for(2) == [1, 2]
    with pytest.raises(ValueError, match="experts_per_task"):
        ModelConfig(experts_per_task=[1, 2]).experts_for(3)
