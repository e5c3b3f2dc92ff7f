"""Model configuration: the `model:` section of a training config.

Pure pydantic (no Ray, no MLflow) so that `models` stays importable on its own. A
`pydantic.ValidationError` is a `ValueError`, and its message names the offending field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

ModelName = Literal[
    "adatt",
    "adatt_sp",
    "mmoe",
    "ml_mmoe",
    "ple",
    "cross_stitch",
    "shared_bottom",
    "single_task",
]


class ModelConfig(BaseModel):
    """Architecture of the multi-task network.

    Args:
        name: model family. `adatt` with `shared_experts: 0` is AdaTT-sp; `adatt_sp` forces it.
        fusion_levels: number of fusion levels L; optional, must equal `len(expert_dims)`
            when given. Read `levels` for L.
        experts_per_task: m_t, one int for every task or one per task.
        shared_experts: m_s, experts of the shared fusion unit (AdaTT general, PLE).
        num_experts: experts per level for MMoE / ML-MMoE; defaults to sum(m_t) + m_s so the
            baselines get the same expert budget as AdaTT.
        expert_dims: per level, the hidden sizes of each expert MLP: `[128, 64]` means a
            one-layer expert of width 128 at level 1 and 64 at level 2; `[[256, 128], [64]]`
            gives multi-layer experts; levels may mix both forms.
        tower_dims: hidden sizes of each task tower; `[]` is a linear head.
        activation: activation inside experts and towers.
        dropout: dropout after each hidden layer of experts and towers.
        dense_projection: if set, dense features are projected to this width before being
            concatenated with the embeddings.
        embeddings: how the id tables are held. `dense`: one `nn.Embedding` per feature,
            replicated on every worker and all-reduced whole at every step (small
            vocabularies). `torchrec`: one TorchRec `EmbeddingBagCollection`, sharded across
            the workers and updated by a fused row-wise optimizer that touches only the rows
            a batch uses, so a step costs the same at 10^5 or 10^7 buckets (docs/models.md).
            A trained model scores the same either way: its logged weights are dense.
        stitch_init: cross-stitch only: its stitch units start as the identity, or as
            `nn.Linear`'s default init (`linear`, the authors' baseline; docs/models.md).
        embedding_init_std: embedding rows start as N(0, std^2). Near zero (the default),
            the network starts from one function for every id and learns each id's
            deviation from that id's rows, instead of first unlearning a random code of
            norm ~sqrt(dim) (torch's N(0, 1), `1.0`); on the synthetic logs this cut the
            worst task's gap to the oracle AUC from 0.098 to 0.042 (docs/models.md).

    Example:
        >>> ModelConfig(name="adatt", expert_dims=[128, 64]).levels
        2
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ModelName = "adatt"
    fusion_levels: PositiveInt | None = None
    experts_per_task: PositiveInt | list[PositiveInt] = 2
    shared_experts: int = Field(default=1, ge=0)
    num_experts: PositiveInt | None = None
    expert_dims: list[PositiveInt | list[PositiveInt]] = Field(
        default_factory=lambda: [128, 64], min_length=1
    )
    tower_dims: list[PositiveInt] = Field(default_factory=lambda: [32])
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    dense_projection: PositiveInt | None = None
    embedding_init_std: float = Field(default=0.05, gt=0.0)
    stitch_init: Literal["identity", "linear"] = "identity"
    embeddings: Literal["dense", "torchrec"] = "dense"

    @model_validator(mode="after")
    def _levels_match_dims(self) -> ModelConfig:
        if self.fusion_levels is not None and self.fusion_levels != len(self.expert_dims):
            raise ValueError(
                f"fusion_levels={self.fusion_levels} does not match expert_dims, which has "
                f"{len(self.expert_dims)} levels: give one entry of expert_dims per level"
            )
        for level in self.expert_dims:
            if isinstance(level, list) and not level:
                raise ValueError("expert_dims: every level needs at least one layer width")
        return self

    @property
    def levels(self) -> int:
        """The number of fusion levels L."""
        return len(self.expert_dims)

    def level_dims(self) -> list[list[int]]:
        """Expert MLP widths per level, always as a list of lists (a copy)."""
        return [list(d) if isinstance(d, list) else [d] for d in self.expert_dims]

    def experts_for(self, num_tasks: int) -> list[int]:
        """m_t for each of `num_tasks` tasks; errors name `experts_per_task`."""
        if num_tasks < 1:
            raise ValueError("tasks: a multi-task model needs at least one task")
        if isinstance(self.experts_per_task, int):
            return [self.experts_per_task] * num_tasks
        if len(self.experts_per_task) != num_tasks:
            raise ValueError(
                f"experts_per_task has {len(self.experts_per_task)} entries but there are "
                f"{num_tasks} tasks"
            )
        return list(self.experts_per_task)


@dataclass(frozen=True)
class CategoricalInput:
    """One embedded feature: `buckets` ids in [0, buckets), embedded in `dim` dimensions."""

    name: str
    buckets: int
    dim: int

    def __post_init__(self) -> None:
        if self.buckets < 1:
            raise ValueError(f"buckets of input {self.name!r} must be >= 1, got {self.buckets}")
        if self.dim < 1:
            raise ValueError(f"dim of input {self.name!r} must be >= 1, got {self.dim}")


@dataclass(frozen=True)
class FeatureSchema:
    """What the network sees of the data, derived from the data config by the pipeline.

    Batches are dicts of tensors:
      - `categorical`: int64 [B, len(categorical)], bucket ids.
      - `dense`: float32 [B, num_dense], already transformed.
      - `multi_hot.<name>`: int64 [B, L] for each entry of `multi_hot`; 0 is padding and
        real ids are in [1, buckets).
    """

    categorical: tuple[CategoricalInput, ...] = ()
    num_dense: int = 0
    multi_hot: tuple[CategoricalInput, ...] = ()
    tasks: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.num_dense < 0:
            raise ValueError(f"num_dense must be >= 0, got {self.num_dense}")
        names = [c.name for c in (*self.categorical, *self.multi_hot)]
        if len(set(names)) != len(names):
            raise ValueError(f"categorical/multi_hot: input names must be unique, got {names}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: task names must be unique, got {list(self.tasks)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, stored with checkpoints.

        Example:
            >>> s = FeatureSchema(num_dense=3, tasks=("click",))
            >>> FeatureSchema.from_dict(s.to_dict()) == s
            True
        """
        return {
            "categorical": [_input_dict(c) for c in self.categorical],
            "num_dense": self.num_dense,
            "multi_hot": [_input_dict(c) for c in self.multi_hot],
            "tasks": list(self.tasks),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSchema:
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        unknown = set(data) - {"categorical", "num_dense", "multi_hot", "tasks"}
        if unknown:
            raise ValueError(f"FeatureSchema: unknown field(s) {sorted(unknown)}")
        return cls(
            categorical=tuple(CategoricalInput(**c) for c in data.get("categorical", ())),
            num_dense=int(data.get("num_dense", 0)),
            multi_hot=tuple(CategoricalInput(**c) for c in data.get("multi_hot", ())),
            tasks=tuple(data.get("tasks", ())),
        )


def _input_dict(feature: CategoricalInput) -> dict[str, Any]:
    return {"name": feature.name, "buckets": feature.buckets, "dim": feature.dim}
