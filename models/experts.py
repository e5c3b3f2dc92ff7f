"""Batched experts: many small MLPs of one architecture computed as a few big matmuls.

Every model in this package is built from `StackedLinear` (G independent linear layers,
weights stacked as [G, in, out]) and `ExpertGroup` (all experts of one fusion level). No
Python loop runs over experts: a level is one 2-D matmul when every expert reads the same
input, and one batched matmul over units (tasks) when each unit's experts read that unit's
own input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The activation function called `name`; a ValueError names the field otherwise."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class StackedLinear(nn.Module):
    """`groups` independent linear layers with stacked weights.

    The weight is stored input-major, [in, G, out], so that applying every group to one
    shared input is a single 2-D matmul with the weight viewed as [in, G * out] (no copy),
    and applying group g to its own input is a batched matmul over groups. Initialised like
    `nn.Linear` (uniform in +-1/sqrt(in_features)).

    Args:
        groups: number of independent layers G.
        in_features: input width of each layer.
        out_features: output width of each layer.

    Example:
        >>> layer = StackedLinear(groups=3, in_features=8, out_features=4)
        >>> layer(torch.randn(3, 5, 8)).shape  # group g reads x[g]
        torch.Size([3, 5, 4])
        >>> layer.shared(torch.randn(5, 8)).shape  # every group reads the same x
        torch.Size([5, 3, 4])
    """

    def __init__(self, groups: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.groups, self.in_features, self.out_features = groups, in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(in_features, groups, out_features))
        self.bias = nn.Parameter(torch.empty(groups, out_features))
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """[U, B, in] -> [G, B, out]: group g's input x[g] through group g's layer.

        x may hold more units than there are groups (U > G); the extra units are ignored,
        as the shared unit at the last level of AdaTT and PLE, which has no gate.
        """
        weight, bias = self.weight, self.bias
        extra = x.shape[0] - self.groups
        if extra:
            # Zero layers for the extra units rather than slicing x: a slice's backward
            # would zero-fill and copy a gradient as large as x.
            weight, bias = F.pad(weight, (0, 0, 0, extra)), F.pad(bias, (0, 0, 0, extra))
        out = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(0, 1))
        return out[: self.groups] if extra else out

    def shared(self, x: Tensor) -> Tensor:
        """[B, in] -> [B, G, out]: every group applied to the same input, one 2-D matmul."""
        out = torch.addmm(self.bias.flatten(), x, self.weight.flatten(1))
        return out.unflatten(1, (self.groups, self.out_features))

    def group(self, index: int) -> tuple[Tensor, Tensor]:
        """Weight [in, out] and bias [out] of one group (for tests and weight copies)."""
        return self.weight[:, index], self.bias[index]

    def extra_repr(self) -> str:
        return f"groups={self.groups}, in_features={self.in_features}, out_features={self.out_features}"


class MaskedStackedLinear(nn.Module):
    """A `StackedLinear` that stores only the outputs each group may produce.

    `visible[g, o]` says whether group g has output o. The parameters hold the visible
    entries only (`weight` [in, V], `bias` [V]), so a model's parameter count is what it
    uses; `dense()` scatters them into the [in, G, out] layout (zeros elsewhere) and the
    forward passes are `StackedLinear`'s on that. Initialised like `nn.Linear`.

    Example:
        >>> layer = MaskedStackedLinear(8, [[True, False], [True, True]])
        >>> layer.weight.shape, layer(torch.randn(2, 5, 8)).shape
        (torch.Size([8, 3]), torch.Size([2, 5, 2]))
    """

    def __init__(self, in_features: int, visible: Sequence[Sequence[bool]]) -> None:
        super().__init__()
        self.groups, self.out_features = len(visible), len(visible[0])
        self.in_features = in_features
        # From Python values: the model may be built on the meta device (no nonzero there).
        flat = [i for i, seen in enumerate(v for row in visible for v in row) if seen]
        self.visible_flat = flat
        self.register_buffer("index", torch.tensor(flat, dtype=torch.long), persistent=False)
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(
            torch.empty(in_features, len(self.index)).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(torch.empty(len(self.index)).uniform_(-bound, bound))

    def dense(self) -> tuple[Tensor, Tensor]:
        """Weight [in, G, out] and bias [G, out], zero where a group has no output."""
        size = self.groups * self.out_features
        weight = self.weight.new_zeros(self.in_features, size).index_copy(
            1, self.index, self.weight
        )
        bias = self.bias.new_zeros(size).index_copy(0, self.index, self.bias)
        return (
            weight.view(self.in_features, self.groups, self.out_features),
            bias.view(self.groups, self.out_features),
        )

    def forward(self, x: Tensor) -> Tensor:
        """[U, B, in] -> [G, B, out], as `StackedLinear.forward`."""
        return StackedLinear.forward(_Dense(*self.dense()), x)  # type: ignore[arg-type]

    def shared(self, x: Tensor) -> Tensor:
        """[B, in] -> [B, G, out], as `StackedLinear.shared`."""
        return StackedLinear.shared(_Dense(*self.dense()), x)  # type: ignore[arg-type]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # Written when the full [in, G, out] layer was stored (hidden entries zero).
        # The index from Python values: on the meta device (a warm start's check) the
        # buffer holds none.
        weight = state_dict.get(f"{prefix}weight")
        if weight is not None and weight.dim() == 3:
            index = torch.tensor(self.visible_flat, dtype=torch.long, device=weight.device)
            state_dict[f"{prefix}weight"] = weight.flatten(1)[:, index]
            state_dict[f"{prefix}bias"] = state_dict[f"{prefix}bias"].flatten()[index]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _Dense:
    """The attributes `StackedLinear`'s forward passes read, for a dense view."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        self.weight, self.bias = weight, bias
        self.groups, self.out_features = bias.shape


class ExpertGroup(nn.Module):
    """All experts of one fusion level: MLPs of one architecture, grouped by input unit.

    Unit u owns `experts_per_unit[u]` experts, which read that unit's input. Experts are
    numbered unit by unit (unit 0's experts first), which is the column order of the
    fusion weights. Each expert layer is Linear -> activation -> dropout.

    Args:
        input_dim: width of each unit's input.
        hidden_dims: layer widths of every expert (one entry = one-layer experts).
        experts_per_unit: number of experts of each unit (entries >= 1).
        activation: name in `ACTIVATIONS`.
        dropout: dropout probability after each layer.

    Example:
        >>> group = ExpertGroup(16, [32], experts_per_unit=[2, 1])
        >>> group(torch.randn(4, 16)).shape  # one input read by every expert
        torch.Size([4, 3, 32])
        >>> group(torch.randn(2, 4, 16)).shape  # one input per unit
        torch.Size([4, 3, 32])
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        experts_per_unit: Sequence[int],
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not hidden_dims or min(hidden_dims) < 1:
            raise ValueError(f"expert_dims: layer widths must be >= 1, got {list(hidden_dims)}")
        if not experts_per_unit or min(experts_per_unit) < 1:
            raise ValueError(f"experts_per_unit must be >= 1, got {list(experts_per_unit)}")
        self.experts_per_unit = list(experts_per_unit)
        self.num_experts = sum(self.experts_per_unit)
        self.output_dim = hidden_dims[-1]
        self.activation = activation_fn(activation)
        self.dropout = dropout
        widths = [input_dim, *hidden_dims]
        self.layers = nn.ModuleList(
            StackedLinear(self.num_experts, d_in, d_out)
            for d_in, d_out in zip(widths[:-1], widths[1:], strict=True)
        )

    def _activate(self, x: Tensor) -> Tensor:
        """Activation then dropout.

        Not in place: the pre-activations are often views (of a matmul over all experts),
        and an in-place op on a view makes autograd copy and zero-fill the whole base.
        """
        return F.dropout(self.activation(x), self.dropout, self.training)

    def forward(self, x: Tensor) -> Tensor:
        """Expert outputs [B, E, H].

        Args:
            x: [B, D] read by every expert, or [U, B, D] where unit u's experts read x[u].
        """
        first = self.layers[0]
        if x.dim() == 2:
            # Every expert reads the same input: one 2-D matmul for all of them.
            h = first.shared(x)
        elif len(set(self.experts_per_unit)) == 1:
            # Every unit owns m experts: one batched matmul over units, m experts side by side.
            units, batch = len(self.experts_per_unit), x.shape[1]
            weight = first.weight.view(first.in_features, units, -1).transpose(0, 1)
            bias = first.bias.view(units, 1, -1)
            h = torch.baddbmm(bias, x, weight).transpose(0, 1).reshape(batch, self.num_experts, -1)
        else:
            # Unequal m_u: one matmul per unit over all of its experts (a loop over units).
            outs, start = [], 0
            for unit, m in enumerate(self.experts_per_unit):
                weight = first.weight[:, start : start + m].flatten(1)
                outs.append(torch.addmm(first.bias[start : start + m].flatten(), x[unit], weight))
                start += m
            h = torch.cat(outs, dim=1).unflatten(1, (self.num_experts, first.out_features))
        h = self._activate(h)
        if len(self.layers) > 1:
            # Deeper expert layers: one batched matmul with the experts as the batch.
            h = h.transpose(0, 1)
            for layer in self.layers[1:]:
                h = self._activate(layer(h))
            h = h.transpose(0, 1)
        return h
