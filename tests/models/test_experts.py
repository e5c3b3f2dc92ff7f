"""Batched experts equal a loop of independent layers, in every input layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from models.experts import ExpertGroup, StackedLinear, activation_fn


def _expert(group: ExpertGroup, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of the group, computed alone."""
    for layer in group.layers:
        x = group.activation(x @ layer.weight[:, e] + layer.bias[e])
    return x


def test_stacked_linear_equals_separate_layers():
    layer = StackedLinear(3, 5, 4)
    x = torch.randn(3, 7, 5)
    expected = torch.stack([x[g] @ layer.weight[:, g] + layer.bias[g] for g in range(3)])
    torch.testing.assert_close(layer(x), expected)
    shared = layer.shared(x[0])
    for g in range(3):
        torch.testing.assert_close(shared[:, g], x[0] @ layer.weight[:, g] + layer.bias[g])
    weight, bias = layer.group(1)
    assert torch.equal(weight, layer.weight[:, 1]) and torch.equal(bias, layer.bias[1])


def test_stacked_linear_ignores_units_beyond_its_groups():
    layer = StackedLinear(2, 5, 4)
    x = torch.randn(3, 7, 5, requires_grad=True)
    out = layer(x)
    assert out.shape == (2, 7, 4)
    torch.testing.assert_close(
        out, torch.stack([x[g] @ layer.weight[:, g] + layer.bias[g] for g in range(2)])
    )
    out.sum().backward()
    assert x.grad[2].abs().max() == 0 and x.grad[:2].abs().min() > 0
    assert layer.weight.grad.shape == layer.weight.shape


def test_stacked_linear_init_like_nn_linear():
    layer = StackedLinear(2, 100, 50)
    assert layer.weight.abs().max() <= 0.1 and layer.bias.abs().max() <= 0.1
    assert layer.weight.std() > 0.04  # uniform(-0.1, 0.1) has std 0.058


@settings(max_examples=20, deadline=None)
@given(
    experts_per_unit=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    hidden_dims=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    shared_input=st.booleans(),
)
def test_group_equals_each_expert_alone(experts_per_unit, hidden_dims, shared_input):
    group = ExpertGroup(6, hidden_dims, experts_per_unit)
    units = len(experts_per_unit)
    x = torch.randn(5, 6) if shared_input else torch.randn(units, 5, 6)
    owner = [u for u, m in enumerate(experts_per_unit) for _ in range(m)]
    expected = torch.stack(
        [_expert(group, e, x if shared_input else x[u]) for e, u in enumerate(owner)], dim=1
    )
    torch.testing.assert_close(group(x), expected)


def test_dropout_only_in_training():
    group = ExpertGroup(6, [50], [4], dropout=0.5)
    x = torch.randn(8, 6)
    group.eval()
    torch.testing.assert_close(group(x), group(x))
    group.train()
    torch.manual_seed(0)
    out = group(x)
    assert (out == 0).float().mean() > 0.6  # ReLU zeros plus half dropped


def test_activation_choice_and_errors():
    group = ExpertGroup(3, [4], [1], activation="tanh")
    x = torch.randn(2, 3)
    torch.testing.assert_close(
        group(x)[:, 0], torch.tanh(x @ group.layers[0].weight[:, 0] + group.layers[0].bias[0])
    )
    assert activation_fn("gelu") is F.gelu
    with pytest.raises(ValueError, match="activation"):
        activation_fn("swish")
    with pytest.raises(ValueError, match="expert_dims"):
        ExpertGroup(3, [0], [1])
    with pytest.raises(ValueError, match="experts_per_unit"):
        ExpertGroup(3, [2], [1, 0])
