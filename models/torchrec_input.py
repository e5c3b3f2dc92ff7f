"""The input layer with its id tables in one TorchRec `EmbeddingBagCollection`.

It gives what `FeatureInput` gives ([categorical embeddings, pooled multi-hot, dense or its
projection], in that order) for the same batch, with the ids handed over as one
`KeyedJaggedTensor` (`keyed_jagged`): a categorical feature is a bag of one id (sum
pooling), a multi-hot feature the bag of its non-padding ids (mean pooling; an empty bag
gives zeros, as `nn.EmbeddingBag` does with padding).

The tables are created on the meta device: TorchRec's `DistributedModelParallel`
(`pipeline.training.sharding`) shards them across the workers, and each worker allocates and
initialises only its own shards (N(0, init_std^2), as the dense layer). `dense_names` maps
the tables' parameters to `FeatureInput`'s, so a trained model's tables load into the dense
layer, which is what the logged model scores with.

Needs the `torchrec` package (`pip install 'adatt-trainer[torchrec]'`, see the README).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from models.config import FeatureSchema
from models.inputs import InputLayer


def table_name(feature: str) -> str:
    """The TorchRec table of a feature."""
    return f"t_{feature}"


def require_torchrec() -> Any:
    """The `torchrec` module; ValueError naming `embeddings` when it is not installed."""
    try:
        import torchrec
    except ImportError as err:
        raise ValueError(
            "embeddings: 'torchrec' needs the torchrec package (pip install "
            f"'adatt-trainer[torchrec]'; see the README): {err}"
        ) from None
    return torchrec


class TorchRecFeatureInput(InputLayer):
    """`FeatureInput` with the id tables in a TorchRec `EmbeddingBagCollection` (`tables`).

    Args:
        schema: the features, sized by the data config.
        dense_projection: if set, dense features pass through a linear layer of this width.
        init_std: table rows start as N(0, init_std^2).

    Example:
        >>> from models.config import CategoricalInput
        >>> schema = FeatureSchema((CategoricalInput("user", 10, 4),), num_dense=3, tasks=("a",))
        >>> layer = TorchRecFeatureInput(schema)
        >>> layer.output_dim, next(layer.tables.parameters()).device.type
        (7, 'meta')
    """

    def __init__(
        self,
        schema: FeatureSchema,
        dense_projection: int | None = None,
        init_std: float = 0.05,
    ) -> None:
        super().__init__(schema)
        torchrec = require_torchrec()
        sum_, mean = torchrec.PoolingType.SUM, torchrec.PoolingType.MEAN
        configs = [
            torchrec.EmbeddingBagConfig(
                name=table_name(f.name),
                embedding_dim=f.dim,
                num_embeddings=f.buckets,
                feature_names=[f.name],
                pooling=pooling,
                init_fn=partial(nn.init.normal_, std=init_std),
            )
            for features, pooling in ((schema.categorical, sum_), (schema.multi_hot, mean))
            for f in features
        ]
        if not configs:
            raise ValueError(
                "embeddings: 'torchrec' holds id tables; give at least one categorical or "
                "multi_hot feature, or use 'dense'"
            )
        self.schema = schema
        self.tables = torchrec.EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
        self._init_dense(schema, dense_projection)

    def forward(self, features: dict[str, Any]) -> Tensor:
        """[B, output_dim] from a batch dict: the ids as `sparse` (a `KeyedJaggedTensor`),
        or built from `categorical` and `multi_hot.<name>` here (`keyed_jagged`)."""
        sparse = features.get("sparse")
        if sparse is None:
            sparse = keyed_jagged(features, self.schema)
        parts = [self.tables(sparse).values(), *self._dense(features)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def keyed_jagged(features: dict[str, Tensor], schema: FeatureSchema) -> Any:
    """The ids of a batch as one TorchRec `KeyedJaggedTensor`, keys in table order.

    Args:
        features: a batch as `Preprocessor.transform` makes it: `categorical` [B, C] ids,
            `multi_hot.<name>` [B, L] ids with 0 as padding.
        schema: the features.

    Example:
        >>> from models.config import CategoricalInput
        >>> schema = FeatureSchema((CategoricalInput("user", 10, 4),),
        ...     multi_hot=(CategoricalInput("recent", 10, 4),), tasks=("a",))
        >>> batch = {"categorical": torch.tensor([[3], [5]]),
        ...     "multi_hot.recent": torch.tensor([[2, 0], [0, 0]])}
        >>> kjt = keyed_jagged(batch, schema)
        >>> kjt.keys(), kjt.values().tolist(), kjt.lengths().tolist()
        (['user', 'recent'], [3, 5, 2], [1, 1, 1, 0])
    """
    torchrec = require_torchrec()
    keys, values, lengths = [], [], []
    if schema.categorical:
        ids = features["categorical"]
        keys += [f.name for f in schema.categorical]
        values.append(ids.t().reshape(-1))  # key-major: every row's id of a feature in turn
        lengths.append(torch.ones(ids.numel(), dtype=torch.int32, device=ids.device))
    for f in schema.multi_hot:
        ids = features[f"multi_hot.{f.name}"]
        kept = ids > 0
        keys.append(f.name)
        values.append(ids[kept])
        lengths.append(kept.sum(dim=1, dtype=torch.int32))
    return torchrec.KeyedJaggedTensor(
        keys=keys, values=torch.cat(values), lengths=torch.cat(lengths)
    )


def dense_names(schema: FeatureSchema) -> dict[str, str]:
    """Each table's parameter name in `TorchRecFeatureInput` -> its name in `FeatureInput`
    (relative to the input layer)."""
    names = {
        f"tables.embedding_bags.{table_name(f.name)}.weight": f"embeddings.{i}.weight"
        for i, f in enumerate(schema.categorical)
    }
    names.update(
        {
            f"tables.embedding_bags.{table_name(f.name)}.weight": f"bags.{j}.weight"
            for j, f in enumerate(schema.multi_hot)
        }
    )
    return names
