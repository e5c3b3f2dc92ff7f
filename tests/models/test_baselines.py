"""Shared-bottom, single-task and cross-stitch backbones."""

from __future__ import annotations

import pytest
import torch

from models.baselines import CrossStitch, SharedBottom, SingleTask


def _expert(group, e, x):
    for layer in group.layers:
        x = torch.relu(x @ layer.weight[:, e] + layer.bias[e])
    return x


def test_shared_bottom_gives_every_task_the_same_vector():
    model = SharedBottom(10, num_tasks=3, hidden_dims=[8, 6])
    x = torch.randn(4, 10)
    out, weights = model.forward_with_weights(x)
    assert out.shape == (4, 3, 6) and weights == []
    for t in range(3):
        torch.testing.assert_close(out[:, t], _expert(model.networks, 0, x))


def test_single_task_networks_are_independent():
    model = SingleTask(10, num_tasks=3, hidden_dims=[8, 6])
    x = torch.randn(4, 10)
    out = model(x)
    for t in range(3):
        torch.testing.assert_close(out[:, t], _expert(model.networks, t, x))
    out[:, 1].sum().backward()
    grads = model.networks.layers[0].weight.grad.transpose(0, 1).flatten(1).abs().sum(1)
    assert grads[1] > 0 and grads[0] == 0 and grads[2] == 0  # task 1's loss touches only its net


def test_cross_stitch_starts_as_separate_networks_and_learns_to_mix():
    torch.manual_seed(0)
    model = CrossStitch(10, num_tasks=2, level_dims=[[8], [6]])
    assert all(torch.equal(s, torch.eye(2)) for s in model.stitches)
    x = torch.randn(5, 10)
    out = model(x)
    for t in range(2):
        torch.testing.assert_close(
            out[:, t], _expert(model.levels[1], t, _expert(model.levels[0], t, x))
        )
    out[:, 0].sum().backward()
    assert model.stitches[0].grad[0, 1] != 0  # task 0 can learn from task 1's network
    with torch.no_grad():
        model.stitches[1].copy_(torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    h = model.levels[1](_first(model, x))  # level-2 networks on the stitched level-1 output
    torch.testing.assert_close(model(x)[:, 0], 0.5 * h[:, 0] + 0.5 * h[:, 1])


def test_cross_stitch_linear_init_is_the_authors_and_counts_exactly():
    """`stitch_init: linear`: nn.Linear's default, U(-1/sqrt(T), 1/sqrt(T)), no bias; the
    count is T nets per level + one T x T stitch per level, either way."""
    torch.manual_seed(0)
    T, d0, dims = 3, 10, [[8], [6]]
    model = CrossStitch(d0, num_tasks=T, level_dims=dims, stitch_init="linear")
    for stitch in model.stitches:
        assert stitch.shape == (T, T) and not torch.equal(stitch, torch.eye(T))
        assert stitch.abs().max() <= T**-0.5
    expected = T * (d0 * 8 + 8) + T * (8 * 6 + 6) + 2 * T * T
    assert sum(p.numel() for p in model.parameters()) == expected
    identity = CrossStitch(d0, num_tasks=T, level_dims=dims)
    assert sum(p.numel() for p in identity.parameters()) == expected
    with pytest.raises(ValueError, match="stitch_init"):
        CrossStitch(d0, num_tasks=T, level_dims=dims, stitch_init="eye")


def _first(model: CrossStitch, x: torch.Tensor) -> torch.Tensor:
    return torch.matmul(model.stitches[0], model.levels[0](x)).transpose(0, 1)


def test_shared_bottom_loads_checkpoints_that_named_its_mlp_bottom() -> None:
    torch.manual_seed(0)
    model = SharedBottom(10, num_tasks=3, hidden_dims=[8])
    old = {k.replace("networks.", "bottom.", 1): v for k, v in model.state_dict().items()}
    assert all(k.startswith("bottom.") for k in old)
    restored = SharedBottom(10, num_tasks=3, hidden_dims=[8])
    restored.load_state_dict(old)
    x = torch.randn(4, 10)
    torch.testing.assert_close(restored(x), model(x))
