"""MMoE and ML-MMoE: gates read the input, sum to 1; outputs equal an explicit loop."""

from __future__ import annotations

import pytest
import torch

from models.mmoe import MLMMoE


def _expert(group, e, x):
    for layer in group.layers:
        x = torch.relu(x @ layer.weight[:, e] + layer.bias[e])
    return x


def _loop(model: MLMMoE, x: torch.Tensor) -> torch.Tensor:
    """ML-MMoE written expert by expert and gate by gate."""
    logits = model.gates(x).split([r * model.num_experts for r in model.gate_rows], dim=1)
    inputs = [x] * model.num_experts
    for level, (group, level_logits) in enumerate(zip(model.levels, logits, strict=True)):
        experts = [_expert(group, e, inputs[e]) for e in range(model.num_experts)]
        gates = torch.softmax(level_logits.unflatten(1, (model.gate_rows[level], -1)), dim=-1)
        inputs = [
            sum(gates[:, r, e : e + 1] * experts[e] for e in range(model.num_experts))
            for r in range(model.gate_rows[level])
        ]
    return torch.stack(inputs, dim=1)


@pytest.mark.parametrize("level_dims", [[[8, 6]], [[8], [6]], [[8], [7, 6], [5]]])
def test_equals_loop(level_dims):
    torch.manual_seed(0)
    model = MLMMoE(10, num_tasks=3, num_experts=4, level_dims=level_dims)
    x = torch.randn(6, 10)
    torch.testing.assert_close(model(x), _loop(model, x), atol=1e-5, rtol=1e-5)


def test_gates_sum_to_one_with_expected_rows():
    model = MLMMoE(10, num_tasks=2, num_experts=5, level_dims=[[8], [6]])
    out, gates = model.forward_with_weights(torch.randn(6, 10))
    assert out.shape == (6, 2, 6)
    assert [tuple(g.shape) for g in gates] == [(6, 5, 5), (6, 2, 5)]
    for g in gates:
        torch.testing.assert_close(g.sum(-1), torch.ones(g.shape[:2]))
    labels = model.fusion_weight_labels(["a", "b"])
    assert labels[0][0] == [f"next/e{i}" for i in range(5)] and labels[1][0] == ["a", "b"]
    assert labels[1][1] == [f"e{i}" for i in range(5)]


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="num_experts"):
        MLMMoE(4, 2, 0, [[4]])
    with pytest.raises(ValueError, match="tasks"):
        MLMMoE(4, 0, 2, [[4]])
