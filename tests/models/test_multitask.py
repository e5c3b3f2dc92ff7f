"""MultiTaskModel: one output per task, fusion weights and labels for every model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import CategoricalInput, FeatureSchema, MultiTaskModel, build_model

SCHEMA = FeatureSchema(
    categorical=(CategoricalInput("user", 50, 4), CategoricalInput("item", 30, 3)),
    num_dense=5,
    multi_hot=(CategoricalInput("history", 40, 6),),
    tasks=("click", "like"),
)


def _batch(n: int = 8):
    torch.manual_seed(0)
    return {
        "categorical": torch.stack([torch.randint(0, 50, (n,)), torch.randint(0, 30, (n,))], 1),
        "dense": torch.randn(n, 5),
        "multi_hot.history": torch.randint(0, 40, (n, 3)),
    }


@pytest.mark.parametrize(
    ("name", "levels"),
    [
        ("adatt", 2),
        ("adatt_sp", 2),
        ("mmoe", 1),
        ("ml_mmoe", 2),
        ("ple", 2),
        ("cross_stitch", 0),
        ("shared_bottom", 0),
        ("single_task", 0),
    ],
)
def test_outputs_and_fusion_weights(name, levels):
    model = build_model({"name": name, "expert_dims": [8, 4], "tower_dims": [4]}, SCHEMA)
    assert isinstance(model, MultiTaskModel)
    batch = _batch()
    assert model(batch).shape == (8, 2)
    model.eval()
    weights = model.fusion_weights(batch)
    labels = model.fusion_weight_labels()
    assert len(weights) == len(labels) == levels
    for w, (rows, columns) in zip(weights, labels, strict=True):
        assert w.shape == (len(rows), len(columns)) and not w.requires_grad
        assert rows[: len(SCHEMA.tasks)] == ["click", "like"] or rows[0].startswith("next/")


def test_adatt_fusion_weights_are_batch_means_of_pad_v_plus_g():
    model = build_model({"name": "adatt", "experts_per_task": [1, 2], "shared_experts": 1}, SCHEMA)
    batch = _batch()
    weights = model.fusion_weights(batch)
    assert [tuple(w.shape) for w in weights] == [(3, 4), (2, 4)]
    level = model.backbone.levels[1]
    gates = weights[1] - level.native_matrix()
    torch.testing.assert_close(gates.sum(-1), torch.ones(2))
    _, per_example = model.backbone.forward_with_weights(model.inputs(batch))
    torch.testing.assert_close(weights[0], per_example[0].mean(0))
    assert model.fusion_weight_labels()[0] == (
        ["click", "like", "shared"],
        ["click/e0", "like/e0", "like/e1", "shared/e0"],
    )


def test_models_import_neither_ray_nor_mlflow():
    code = (
        "import sys, models; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'pipeline'}); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
