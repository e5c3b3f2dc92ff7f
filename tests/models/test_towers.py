"""Towers: batched per-task MLPs equal separate towers; an empty list is a linear head."""

from __future__ import annotations

import pytest
import torch

from models.towers import Towers


def test_towers_equal_separate_mlps():
    towers = Towers(input_dim=6, num_tasks=3, hidden_dims=[5, 4])
    x = torch.randn(7, 3, 6)
    expected = []
    for t in range(3):
        h = x[:, t]
        for layer in towers.hidden:
            h = torch.relu(h @ layer.weight[:, t] + layer.bias[t])
        expected.append(h @ towers.head.weight[:, t] + towers.head.bias[t])
    torch.testing.assert_close(towers(x), torch.cat(expected, dim=1))


def test_empty_tower_is_linear_head():
    towers = Towers(input_dim=6, num_tasks=2, hidden_dims=[])
    assert len(towers.hidden) == 0
    x = torch.randn(4, 2, 6)
    expected = (
        torch.einsum("btd,td->bt", x, towers.head.weight[..., 0].t()) + towers.head.bias[:, 0]
    )
    torch.testing.assert_close(towers(x), expected)
    assert sum(p.numel() for p in towers.parameters()) == 2 * (6 + 1)


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="tasks"):
        Towers(4, 0, [])
    with pytest.raises(ValueError, match="tower_dims"):
        Towers(4, 2, [3, 0])
