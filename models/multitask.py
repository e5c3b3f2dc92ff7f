"""MultiTaskModel: input layer + backbone + towers, one output per task."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.backbone import Backbone
from models.config import FeatureSchema, ModelConfig
from models.inputs import FeatureInput
from models.towers import Towers


class MultiTaskModel(nn.Module):
    """A multi-task network: `FeatureInput` -> backbone (AdaTT or a baseline) -> `Towers`.

    Build it with `models.build_model`. `model_config` and `schema` hold what it was built
    from, so a checkpoint that stores them (as `model_config.model_dump()` and
    `schema.to_dict()`) restores the exact architecture.

    Args:
        inputs: the input layer.
        backbone: maps the input vector to one representation per task.
        towers: one head per task.
        model_config: the config the model was built from.
        schema: the features and tasks the model was built for.

    Example:
        >>> from models import build_model
        >>> schema = FeatureSchema(num_dense=8, tasks=("click", "buy"))
        >>> model = build_model({"name": "adatt", "expert_dims": [16, 8]}, schema)
        >>> model({"dense": torch.randn(4, 8)}).shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        inputs: FeatureInput,
        backbone: Backbone,
        towers: Towers,
        model_config: ModelConfig,
        schema: FeatureSchema,
    ) -> None:
        super().__init__()
        self.inputs, self.backbone, self.towers = inputs, backbone, towers
        self.model_config, self.schema = model_config, schema

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """One logit (or raw regression output) per task, [B, T] in `schema.tasks` order."""
        return self.towers(self.backbone(self.inputs(features)))

    @torch.no_grad()
    def fusion_weights(self, features: dict[str, Tensor]) -> list[Tensor]:
        """Per fusion level, the fusion weights averaged over the batch, [rows, experts].

        AdaTT: pad(v_t) + G_t per task (plus the shared unit below the last level);
        MMoE / ML-MMoE / PLE: the gate softmax; models without gates: [].
        Runs in the model's current mode (call `eval()` first for weights without dropout).
        """
        _, weights = self.backbone.forward_with_weights(self.inputs(features))
        return [w.mean(dim=0) for w in weights]

    def fusion_weight_labels(self) -> list[tuple[list[str], list[str]]]:
        """(row names, column names) of each level of `fusion_weights`, for plots."""
        return self.backbone.fusion_weight_labels(self.schema.tasks)
