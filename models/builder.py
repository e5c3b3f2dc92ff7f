"""One builder: a `model:` config section and the feature schema -> a MultiTaskModel."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from models.adatt import AdaTT
from models.backbone import Backbone
from models.baselines import CrossStitch, SharedBottom, SingleTask
from models.config import FeatureSchema, ModelConfig
from models.inputs import FeatureInput
from models.mmoe import MLMMoE
from models.multitask import MultiTaskModel
from models.ple import PLE
from models.towers import Towers


def build_model(
    model_config: ModelConfig | Mapping[str, Any], schema: FeatureSchema
) -> MultiTaskModel:
    """Build the network a config describes.

    Args:
        model_config: a `ModelConfig` or a plain mapping (validated; an invalid field raises a
            ValueError naming it). The caller's mapping and lists are never modified.
        schema: input features and task names.

    Returns:
        The model; `model.model_config` and `model.schema` are what it was built from.

    Example:
        >>> import torch
        >>> schema = FeatureSchema(num_dense=482, tasks=("income", "married", "college"))
        >>> model = build_model(
        ...     {"name": "adatt", "fusion_levels": 2, "experts_per_task": 2, "shared_experts": 1,
        ...      "expert_dims": [128, 64], "tower_dims": [32]}, schema)
        >>> [tuple(w.shape) for w in model.fusion_weights({"dense": torch.randn(4, 482)})]
        [(4, 7), (3, 7)]
    """
    if not isinstance(model_config, ModelConfig):
        if not isinstance(model_config, Mapping):
            raise ValueError(
                f"model: expected a mapping or ModelConfig, got {type(model_config).__name__}"
            )
        model_config = ModelConfig.model_validate(copy.deepcopy(dict(model_config)))
    if not schema.tasks:
        raise ValueError("tasks: a multi-task model needs at least one task")
    # Imported here: TorchRec is an optional dependency, needed only for its tables.
    if model_config.embeddings == "torchrec":
        from models.torchrec_input import TorchRecFeatureInput as input_layer
    else:
        input_layer = FeatureInput
    inputs = input_layer(schema, model_config.dense_projection, model_config.embedding_init_std)
    backbone = build_backbone(model_config, inputs.output_dim, len(schema.tasks))
    towers = Towers(
        backbone.output_dim,
        len(schema.tasks),
        list(model_config.tower_dims),
        model_config.activation,
        model_config.dropout,
    )
    return MultiTaskModel(inputs, backbone, towers, model_config, schema)


def build_backbone(config: ModelConfig, input_dim: int, num_tasks: int) -> Backbone:
    """The backbone named by `config.name`, reading an input of width `input_dim`."""
    experts = config.experts_for(num_tasks)
    levels = config.level_dims()
    flat_dims = [width for level in levels for width in level]  # one-level models: all layers
    shared = 0 if config.name == "adatt_sp" else config.shared_experts
    common = {"activation": config.activation, "dropout": config.dropout}
    if config.name in ("adatt", "adatt_sp"):
        return AdaTT(input_dim, experts, shared, levels, **common)
    if config.name in ("mmoe", "ml_mmoe"):
        num_experts = config.num_experts or sum(experts) + config.shared_experts
        mmoe_levels = [flat_dims] if config.name == "mmoe" else levels
        return MLMMoE(input_dim, num_tasks, num_experts, mmoe_levels, **common)
    if config.name == "ple":
        return PLE(input_dim, experts, config.shared_experts, levels, **common)
    if config.name == "cross_stitch":
        return CrossStitch(input_dim, num_tasks, levels, **common, stitch_init=config.stitch_init)
    if config.name == "shared_bottom":
        return SharedBottom(input_dim, num_tasks, flat_dims, **common)
    if config.name == "single_task":
        return SingleTask(input_dim, num_tasks, flat_dims, **common)
    raise ValueError(f"name: unknown model {config.name!r}")


def build_on_meta(
    model_config: ModelConfig | Mapping[str, Any], schema: FeatureSchema
) -> MultiTaskModel:
    """The network on the meta device, not initialised: its modules and shapes, and every
    check `build_model` makes (a ValueError naming the field), with no memory for its
    tables. (On meta tensors `nn.init.normal_` runs PyTorch's Python decomposition, whose
    first use imports torch._dynamo: 1.1 s of every command that read a config.)

    Example:
        >>> network = build_on_meta({"name": "mmoe"}, FeatureSchema(num_dense=4, tasks=("a",)))
        >>> {p.device.type for p in network.parameters()}
        {'meta'}
        >>> build_on_meta({"name": "mmoe"}, FeatureSchema(num_dense=4, tasks=()))
        Traceback (most recent call last):
        ...
        ValueError: tasks: a multi-task model needs at least one task
    """
    with torch.device("meta"), _Uninitialised():
        return build_model(model_config, schema)


class _Uninitialised(TorchFunctionMode):
    """`torch.nn.init`'s functions leave their tensor as it is (this thread only)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)
