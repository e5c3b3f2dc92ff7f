"""The input layer: one vector per example from categorical, dense and multi-hot features."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.config import FeatureSchema

# Embedding rows start near zero (torch's default is N(0, 1)): the network then starts from
# the same function for every id and learns each id's deviation from its data, instead of
# first having to unlearn a random code of norm ~sqrt(dim) per id. On the synthetic logs
# this closed half the gap to the oracle AUC (docs/models.md).
EMBEDDING_INIT_STD = 0.05


class FeatureInput(nn.Module):
    """Embeds categorical and multi-hot features and concatenates them with dense features.

    Batch keys (see `FeatureSchema`): `categorical` int64 [B, C], `dense` float32 [B, D],
    `multi_hot.<name>` int64 [B, L] with 0 as padding (mean of the non-padding ids; a row of
    padding only gives zeros). The output is [embeddings of categorical, pooled multi-hot,
    dense or its linear projection, pairwise products], in that order.

    Args:
        schema: the features, sized by the data config.
        dense_projection: if set, dense features pass through a linear layer of this width.
        pairwise_products: also output the element-wise product e_i * e_j of every pair of
            embeddings of equal width (categorical and multi-hot, in schema order). An MLP
            learns a dot product such as <user, item> slowly and only approximately
            (Rendle et al., RecSys 2020); a linear layer over e_i * e_j expresses any
            weighted dot product exactly (DLRM's interaction layer is its plain sum).

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
        pairwise_products: bool = False,
    ) -> None:
        super().__init__()
        if not (schema.categorical or schema.num_dense or schema.multi_hot):
            raise ValueError("schema: the model needs at least one input feature")
        self.embeddings = nn.ModuleList(nn.Embedding(f.buckets, f.dim) for f in schema.categorical)
        self.multi_hot_names = [f.name for f in schema.multi_hot]
        self.bags = nn.ModuleList(
            nn.EmbeddingBag(f.buckets, f.dim, mode="mean", padding_idx=0) for f in schema.multi_hot
        )
        for table in (*self.embeddings, *self.bags):
            nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)
        for bag in self.bags:
            with torch.no_grad():
                bag.weight[0].zero_()  # the padding row stays zero
        self.num_dense = schema.num_dense
        self.projection = (
            nn.Linear(schema.num_dense, dense_projection)
            if dense_projection and schema.num_dense
            else None
        )
        dense_width = dense_projection if self.projection is not None else schema.num_dense
        dims = [f.dim for f in (*schema.categorical, *schema.multi_hot)]
        self.pairs = (
            [
                (i, j)
                for i in range(len(dims))
                for j in range(i + 1, len(dims))
                if dims[i] == dims[j]
            ]
            if pairwise_products
            else []
        )
        if pairwise_products and not self.pairs:
            raise ValueError(
                "pairwise_products: no two embeddings have the same dim; give at least two "
                f"categorical or multi-hot features equal dims (dims: {dims})"
            )
        self.output_dim = sum(dims) + dense_width + sum(dims[i] for i, _ in self.pairs)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """[B, output_dim] from a batch dict."""
        embedded = []
        if self.embeddings:
            ids = _get(features, "categorical")
            if ids.shape[1] != len(self.embeddings):
                raise ValueError(
                    f"categorical: batch has {ids.shape[1]} columns, schema has {len(self.embeddings)}"
                )
            embedded.extend(emb(ids[:, i]) for i, emb in enumerate(self.embeddings))
        for name, bag in zip(self.multi_hot_names, self.bags, strict=True):
            embedded.append(bag(_get(features, f"multi_hot.{name}")))
        parts = list(embedded)
        if self.num_dense:
            dense = _get(features, "dense")
            parts.append(self.projection(dense) if self.projection is not None else dense)
        parts.extend(embedded[i] * embedded[j] for i, j in self.pairs)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _get(features: dict[str, Tensor], key: str) -> Tensor:
    if key not in features:
        raise KeyError(
            f"batch has no {key!r} although the schema declares it; keys: {sorted(features)}"
        )
    return features[key]
