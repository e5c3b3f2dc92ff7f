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
            dense_weight, dense_bias = level.gates.dense()
            weight, bias = dense_weight[:, row][:, seen], dense_bias[row][seen]
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


def test_gates_store_only_what_each_gate_sees_with_exact_counts():
    """Matched budgets: a task gate holds weights for its own and the shared experts, the
    shared gate for all (not at the last level); experts + gates + towers, exactly."""
    from models.towers import Towers

    # Census: 482-wide input embedding, T = 3, m_t = m_s = 2, levels [128], [64].
    d0, m_tasks, m_shared, level_dims = 482, [2, 2, 2], 2, [[128], [64]]
    model, towers = PLE(d0, m_tasks, m_shared, level_dims), Towers(64, 3, [32])
    T, E = len(m_tasks), sum(m_tasks) + m_shared
    expected, dense, width = 0, 0, d0
    for level, (h,) in enumerate(level_dims):
        expected += E * (width * h + h)  # experts
        seen = [m + m_shared for m in m_tasks] + ([E] if level < len(level_dims) - 1 else [])
        expected += sum(seen) * (width + 1)  # each gate: weights and biases of what it sees
        dense += len(seen) * E * (width + 1)  # the former layout: every expert's entry
        width = h
    expected += T * ((width * 32 + 32) + (32 + 1))  # towers
    count = sum(p.numel() for p in [*model.parameters(), *towers.parameters()])
    assert count == expected
    gates = sum(p.numel() for level in model.levels for p in level.gates.parameters())
    assert dense - gates == 7_344  # what the gates used to store and never use


def test_a_checkpoint_with_full_gates_loads_into_the_compact_ones():
    torch.manual_seed(0)
    model = PLE(10, [2, 1], 1, [[8], [6]])
    old = {}
    for name, value in model.state_dict().items():  # the former layout: [in, rows, E]
        level = model.levels[int(name.split(".")[1])] if name.startswith("levels.") else None
        if level is not None and name.endswith("gates.weight"):
            value = level.gates.dense()[0].detach()
        elif level is not None and name.endswith("gates.bias"):
            value = level.gates.dense()[1].detach()
        old[name] = value
    fresh = PLE(10, [2, 1], 1, [[8], [6]])
    fresh.load_state_dict(old)
    x = torch.randn(4, 10)
    torch.testing.assert_close(fresh(x), model(x))
