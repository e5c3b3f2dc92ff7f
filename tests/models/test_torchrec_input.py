"""The TorchRec input layer: the same output as `FeatureInput` for the same weights and batch,
its ids as one KeyedJaggedTensor, and the names that map its tables to the dense layer's."""

from __future__ import annotations

import pytest
import torch

from models import build_model
from models.config import CategoricalInput, FeatureSchema
from models.inputs import FeatureInput
from models.torchrec_input import TorchRecFeatureInput, dense_names, keyed_jagged

SCHEMA = FeatureSchema(
    categorical=(CategoricalInput("user", 50, 4), CategoricalInput("item", 30, 3)),
    num_dense=2,
    multi_hot=(CategoricalInput("recent", 20, 5),),
    tasks=("click", "like"),
)


def _batch(rows: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    recent = torch.randint(1, 20, (rows, 4), generator=g)
    recent[:, 2:] = 0  # padding
    recent[1] = 0  # a row of padding only: zeros, as nn.EmbeddingBag gives
    return {
        "categorical": torch.stack(
            [
                torch.randint(0, 50, (rows,), generator=g),
                torch.randint(0, 30, (rows,), generator=g),
            ],
            1,
        ),
        "dense": torch.randn(rows, 2, generator=g),
        "multi_hot.recent": recent,
    }


def test_output_equals_the_dense_layer_for_the_same_weights() -> None:
    dense = FeatureInput(SCHEMA, dense_projection=3)
    sparse = TorchRecFeatureInput(SCHEMA, dense_projection=3)
    sparse.tables.to_empty(device="cpu")  # built on the meta device for sharding
    names = dense_names(SCHEMA)
    state = dense.state_dict()
    sparse.load_state_dict({k: state[names.get(k, k)] for k in sparse.state_dict()})
    batch = _batch()
    torch.testing.assert_close(sparse(batch), dense(batch))
    assert sparse.output_dim == dense.output_dim == 4 + 3 + 5 + 3


def test_keyed_jagged_is_key_major_without_padding() -> None:
    batch = _batch(rows=3)
    kjt = keyed_jagged(batch, SCHEMA)
    assert kjt.keys() == ["user", "item", "recent"]
    by_key = kjt.to_dict()
    assert by_key["user"].values().tolist() == batch["categorical"][:, 0].tolist()
    assert by_key["item"].lengths().tolist() == [1, 1, 1]
    recent = batch["multi_hot.recent"]
    assert by_key["recent"].lengths().tolist() == (recent > 0).sum(1).tolist()
    assert by_key["recent"].values().tolist() == recent[recent > 0].tolist()


def test_dense_names_cover_every_table_and_match_the_dense_layer() -> None:
    sparse_keys = {k for k in TorchRecFeatureInput(SCHEMA).state_dict() if k.startswith("tables.")}
    names = dense_names(SCHEMA)
    assert set(names) == sparse_keys
    assert set(names.values()) == {k for k in FeatureInput(SCHEMA).state_dict()}


def test_builder_picks_the_layer_and_refuses_tables_without_ids() -> None:
    model = build_model({"embeddings": "torchrec", "expert_dims": [8]}, SCHEMA)
    assert isinstance(model.inputs, TorchRecFeatureInput)
    with pytest.raises(ValueError, match="embeddings: 'torchrec' holds id tables"):
        build_model({"embeddings": "torchrec"}, FeatureSchema(num_dense=3, tasks=("a",)))
