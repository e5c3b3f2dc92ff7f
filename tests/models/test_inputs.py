"""FeatureInput: embeddings, mean-pooled multi-hot without padding, dense (projected)."""

from __future__ import annotations

import pytest
import torch

from models.config import CategoricalInput, FeatureSchema
from models.inputs import FeatureInput

SCHEMA = FeatureSchema(
    categorical=(CategoricalInput("user", 10, 3), CategoricalInput("item", 20, 2)),
    num_dense=4,
    multi_hot=(CategoricalInput("history", 30, 5),),
    tasks=("click",),
)


def _batch():
    return {
        "categorical": torch.tensor([[1, 2], [9, 19]]),
        "dense": torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 1.0]]),
        "multi_hot.history": torch.tensor([[3, 7, 0, 0], [0, 0, 0, 0]]),
    }


def test_concatenates_embeddings_pooled_multi_hot_and_dense():
    layer = FeatureInput(SCHEMA)
    assert layer.output_dim == 3 + 2 + 5 + 4
    out = layer(_batch())
    assert out.shape == (2, 14)
    torch.testing.assert_close(out[0, :3], layer.embeddings[0].weight[1])
    torch.testing.assert_close(out[1, 3:5], layer.embeddings[1].weight[19])
    bag = layer.bags[0].weight
    torch.testing.assert_close(out[0, 5:10], (bag[3] + bag[7]) / 2)  # padding 0 excluded
    torch.testing.assert_close(out[1, 5:10], torch.zeros(5))  # padding only: zeros
    torch.testing.assert_close(out[:, 10:], _batch()["dense"])


def test_dense_projection():
    layer = FeatureInput(SCHEMA, dense_projection=6)
    assert layer.output_dim == 3 + 2 + 5 + 6
    out = layer(_batch())
    torch.testing.assert_close(out[:, 10:], layer.projection(_batch()["dense"]))


def test_absent_kinds_may_be_missing_but_declared_ones_may_not():
    dense_only = FeatureInput(FeatureSchema(num_dense=3, tasks=("a",)))
    x = torch.randn(2, 3)
    torch.testing.assert_close(dense_only({"dense": x}), x)
    with pytest.raises(KeyError, match="multi_hot.history"):
        FeatureInput(SCHEMA)({k: v for k, v in _batch().items() if k != "multi_hot.history"})
    with pytest.raises(ValueError, match="categorical"):
        FeatureInput(SCHEMA)({**_batch(), "categorical": torch.zeros(2, 3, dtype=torch.long)})


def test_no_features_is_an_error():
    with pytest.raises(ValueError, match="input feature"):
        FeatureInput(FeatureSchema(tasks=("a",)))


def test_gradients_reach_embeddings_but_not_padding_row():
    layer = FeatureInput(SCHEMA)
    layer(_batch()).sum().backward()
    assert layer.embeddings[0].weight.grad[1].abs().sum() > 0
    assert layer.bags[0].weight.grad[3].abs().sum() > 0
    assert layer.bags[0].weight.grad[0].abs().sum() == 0


@pytest.mark.parametrize("std", [0.05, 1.0])
def test_embeddings_start_at_the_given_scale_and_padding_stays_zero(std):
    schema = FeatureSchema(
        categorical=(CategoricalInput("user", 5000, 8),),
        multi_hot=(CategoricalInput("history", 5000, 8),),
        tasks=("click",),
    )
    layer = FeatureInput(schema, init_std=std)
    for table in (layer.embeddings[0].weight, layer.bags[0].weight[1:]):
        assert float(table.detach().std()) == pytest.approx(std, rel=0.05)
    assert torch.all(layer.bags[0].weight[0] == 0)
