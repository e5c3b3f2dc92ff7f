"""The interface every backbone (AdaTT and the baselines) implements."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn


class Backbone(nn.Module):
    """Maps the input vector [B, D] to one representation per task [B, T, H].

    Subclasses set `output_dim` (H) and implement `forward_with_weights`, which also returns
    the fusion weights of each gated level, [B, rows, experts], for inspection.
    """

    output_dim: int

    def forward_with_weights(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Task representations [B, T, H] and per-level fusion weights ([] without gates)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Task representations [B, T, H]."""
        return self.forward_with_weights(x)[0]

    def fusion_weight_labels(self, tasks: Sequence[str]) -> list[tuple[list[str], list[str]]]:
        """(row names, column names) of each level's fusion weights; [] without gates."""
        return []


class FusionStack(Backbone):
    """A backbone of gated levels applied in turn (AdaTT, PLE): unit u's experts at level
    l + 1 read unit u's output of level l.

    Subclasses fill `levels` with modules mapping the previous outputs to (outputs
    [B, rows, H], fusion weights [B, rows, E]) and set `experts_per_unit` (m_t per task,
    then m_s where there is a shared unit); each level has `fusing_units` rows.
    """

    levels: nn.ModuleList

    def __init__(
        self, name: str, experts_per_task: Sequence[int], shared_experts: int, levels: int
    ) -> None:
        """Check the unit layout and set `num_tasks` and `experts_per_unit` (m_t per task,
        then m_s when there is a shared unit); `name` is the model's, for the errors."""
        super().__init__()
        if not experts_per_task:
            raise ValueError(f"tasks: {name} needs at least one task")
        if min(experts_per_task) < 1:
            raise ValueError(f"experts_per_task must be >= 1, got {list(experts_per_task)}")
        if shared_experts < 0:
            raise ValueError(f"shared_experts must be >= 0, got {shared_experts}")
        if levels < 1:
            raise ValueError(f"expert_dims: {name} needs at least one fusion level")
        self.num_tasks = len(experts_per_task)
        self.experts_per_unit = [*experts_per_task, *([shared_experts] if shared_experts else [])]

    def stack_levels(
        self,
        input_dim: int,
        level_dims: Sequence[Sequence[int]],
        make_level: Callable[[int, list[int], int], nn.Module],
    ) -> None:
        """Build `levels` from `make_level(input width, layer widths, fusing units)`.

        Level l + 1 reads level l's width. Every unit fuses at every level but the last,
        where only the tasks do: no tower reads the shared unit there.
        """
        self.levels = nn.ModuleList()
        width = input_dim
        for index, dims in enumerate(level_dims):
            is_last = index == len(level_dims) - 1
            fusing = self.num_tasks if is_last else len(self.experts_per_unit)
            level = make_level(width, list(dims), fusing)
            self.levels.append(level)
            width = level.output_dim
        self.output_dim = width

    def forward_with_weights(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The task rows of the last level [B, T, H], and each level's fusion weights."""
        h, all_weights = x, []
        for level in self.levels:
            fused, weights = level(h)
            all_weights.append(weights)
            h = fused.transpose(0, 1)  # unit u's experts at the next level read h[u]
        return fused, all_weights

    def fusion_weight_labels(self, tasks: Sequence[str]) -> list[tuple[list[str], list[str]]]:
        """Rows: tasks (+ "shared" where the shared unit fuses); columns: "task/e0", ..."""
        columns = expert_labels(tasks, self.experts_per_unit)
        rows = [*tasks, "shared"]
        return [(rows[: level.fusing_units], list(columns)) for level in self.levels]


def expert_labels(tasks: Sequence[str], experts_per_unit: Sequence[int]) -> list[str]:
    """Column names "task/e0", ..., "shared/e0" for experts numbered unit by unit.

    Example:
        >>> expert_labels(["click", "like"], [2, 1, 1])
        ['click/e0', 'click/e1', 'like/e0', 'shared/e0']
    """
    units = [*tasks, "shared"][: len(experts_per_unit)]
    return [
        f"{unit}/e{i}" for unit, m in zip(units, experts_per_unit, strict=True) for i in range(m)
    ]
