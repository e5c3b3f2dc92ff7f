"""The input layer: one vector per example from categorical, dense and multi-hot features."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.config import FeatureSchema


class InputLayer(nn.Module):
    """What every input layer shares: the dense features (or their linear projection) after
    the embeddings, and the output width."""

    def __init__(self, schema: FeatureSchema) -> None:
        super().__init__()
        if not (schema.categorical or schema.num_dense or schema.multi_hot):
            raise ValueError("schema: the model needs at least one input feature")

    def _init_dense(self, schema: FeatureSchema, dense_projection: int | None) -> None:
        self.num_dense = schema.num_dense
        self.projection = (
            nn.Linear(schema.num_dense, dense_projection)
            if dense_projection and schema.num_dense
            else None
        )
        dense_width = dense_projection if self.projection is not None else schema.num_dense
        self.output_dim = sum(f.dim for f in (*schema.categorical, *schema.multi_hot)) + dense_width

    def _dense(self, features: dict[str, Tensor]) -> list[Tensor]:
        if not self.num_dense:
            return []
        dense = _get(features, "dense")
        return [self.projection(dense) if self.projection is not None else dense]


class FeatureInput(InputLayer):
    """Embeds categorical and multi-hot features and concatenates them with dense features.

    Batch keys (see `FeatureSchema`): `categorical` int64 [B, C], `dense` float32 [B, D],
    `multi_hot.<name>` int64 [B, L] with 0 as padding (mean of the non-padding ids; a row of
    padding only gives zeros). The output is [embeddings of categorical, pooled multi-hot,
    dense or its linear projection], in that order.

    Args:
        schema: the features, sized by the data config.
        dense_projection: if set, dense features pass through a linear layer of this width.
        init_std: embedding rows start as N(0, init_std^2) (see `ModelConfig`).

    Example:
        >>> from models.config import CategoricalInput
        >>> schema = FeatureSchema((CategoricalInput("user", 10, 4),), num_dense=3, tasks=("a",))
        >>> layer = FeatureInput(schema)
        >>> layer({"categorical": torch.zeros(2, 1, dtype=torch.long), "dense": torch.ones(2, 3)}).shape
        torch.Size([2, 7])
    """

    def __init__(
        self,
        schema: FeatureSchema,
        dense_projection: int | None = None,
        init_std: float = 0.05,
    ) -> None:
        super().__init__(schema)
        self.embeddings = nn.ModuleList(nn.Embedding(f.buckets, f.dim) for f in schema.categorical)
        self.multi_hot_names = [f.name for f in schema.multi_hot]
        self.bags = nn.ModuleList(
            nn.EmbeddingBag(f.buckets, f.dim, mode="mean", padding_idx=0) for f in schema.multi_hot
        )
        for table in (*self.embeddings, *self.bags):
            nn.init.normal_(table.weight, std=init_std)
        for bag in self.bags:
            with torch.no_grad():
                bag.weight[0].zero_()  # the padding row stays zero
        self._init_dense(schema, dense_projection)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """[B, output_dim] from a batch dict."""
        parts = []
        if self.embeddings:
            ids = _get(features, "categorical")
            if ids.shape[1] != len(self.embeddings):
                raise ValueError(
                    f"categorical: batch has {ids.shape[1]} columns, schema has {len(self.embeddings)}"
                )
            parts.extend(emb(ids[:, i]) for i, emb in enumerate(self.embeddings))
        for name, bag in zip(self.multi_hot_names, self.bags, strict=True):
            parts.append(bag(_get(features, f"multi_hot.{name}")))
        parts.extend(self._dense(features))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _get(features: dict[str, Tensor], key: str) -> Tensor:
    if key not in features:
        raise KeyError(
            f"batch has no {key!r} although the schema declares it; keys: {sorted(features)}"
        )
    return features[key]
