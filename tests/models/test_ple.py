"""PLE: task gates see own + shared experts only, the shared gate sees all (not last level)."""

from __future__ import annotations

import torch

from models.ple import PLE


def _expert(group, e, x):
    for layer in group.layers:
        x = torch.relu(x @ layer.weight[:, e] + layer.bias[e])
    return x


def _loop(model: PLE, x: torch.Tensor) -> torch.Tensor:
    """PLE with a compact softmax over each gate's visible experts, unit by unit."""
    units = model.experts_per_unit
    owner = [u for u, m in enumerate(units) for _ in range(m)]
    inputs = [x] * len(units)
    for level in model.levels:
        experts = [_expert(level.experts, e, inputs[u]) for e, u in enumerate(owner)]
        outputs = []
        for row in range(level.fusing_units):
            seen = level.visible[row].nonzero().flatten().tolist()
            weight, bias = level.gates.weight[:, row][:, seen], level.gates.bias[row][seen]
            gate = torch.softmax(inputs[row] @ weight + bias, dim=-1)
            outputs.append(sum(gate[:, k : k + 1] * experts[e] for k, e in enumerate(seen)))
        inputs = outputs
    return torch.stack(inputs, dim=1)


def test_equals_loop_with_compact_gates():
    torch.manual_seed(0)
    for experts_per_task, shared in [([2, 2, 2], 1), ([1, 3], 2), ([2, 1], 0)]:
        model = PLE(10, experts_per_task, shared, [[8], [7, 6], [5]])
        x = torch.randn(6, 10)
        torch.testing.assert_close(model(x), _loop(model, x), atol=1e-5, rtol=1e-5)


def test_gate_structure():
    model = PLE(10, [2, 1], 2, [[8], [6]])
    _, gates = model.forward_with_weights(torch.randn(4, 10))
    first, last = gates
    assert first.shape == (4, 3, 5) and last.shape == (4, 2, 5)  # shared gate only below the top
    torch.testing.assert_close(first.sum(-1), torch.ones(4, 3))
    assert (first[:, 0, 2] == 0).all() and (first[:, 1, :2] == 0).all()  # not other tasks' experts
    assert (first[:, 0, [0, 1, 3, 4]] > 0).all() and (first[:, 2] > 0).all()  # shared sees all
    rows, columns = model.fusion_weight_labels(["a", "b"])[0]
    assert rows == ["a", "b", "shared"] and columns == [
        "a/e0",
        "a/e1",
        "b/e0",
        "shared/e0",
        "shared/e1",
    ]


def test_hidden_gate_weights_stay_zero_when_training():
    model = PLE(10, [2, 1], 1, [[8], [6]])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(16, 10)).pow(2).sum().backward()
        optimizer.step()
    for level in model.levels:
        hidden = ~level.visible
        assert (level.gates.weight.detach().permute(1, 2, 0)[hidden] == 0).all()
        assert (level.gates.bias.detach()[hidden] == 0).all()
