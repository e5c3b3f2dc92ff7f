"""AdaTT: equal to the literal loop version of eqs. 4-10, gates, native weights, gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.adatt import AdaTT, AdaTTLevel
from models.reference import LoopAdaTT


def _pair(experts_per_task, shared, level_dims, input_dim=12, seed=0):
    torch.manual_seed(seed)
    batched = AdaTT(input_dim, experts_per_task, shared, level_dims)
    # Random (not default-initialised) native weights and gates make the check stricter.
    with torch.no_grad():
        for p in batched.parameters():
            p.add_(0.3 * torch.randn_like(p))
    loop = LoopAdaTT(input_dim, experts_per_task, shared, level_dims).load_from(batched)
    return batched, loop


@pytest.mark.parametrize(
    ("experts_per_task", "shared", "level_dims"),
    [
        ([1, 1, 1], 0, [[8]]),  # AdaTT-sp, m_t = 1, one level
        ([2, 2, 2], 0, [[8], [6]]),  # AdaTT-sp, m_t > 1
        ([1, 3, 2], 0, [[8], [6], [5]]),  # AdaTT-sp, unequal m_t, three levels
        ([1, 1], 1, [[8], [6]]),  # general, m_t = m_s = 1
        ([2, 2, 2], 2, [[8], [6], [4]]),  # general, m_t > 1
        ([3, 1, 2], 1, [[8, 7], [6]]),  # general, unequal m_t, two-layer experts
        ([2], 3, [[8], [4]]),  # one task
    ],
)
def test_equals_loop_reference(experts_per_task, shared, level_dims):
    batched, loop = _pair(experts_per_task, shared, level_dims)
    x = torch.randn(9, 12)
    torch.testing.assert_close(batched(x), loop(x), atol=1e-5, rtol=1e-5)


def test_input_gradients_equal_loop_reference():
    batched, loop = _pair([2, 1, 3], 1, [[8, 7], [6]])
    x1 = torch.randn(9, 12, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    (batched(x1) ** 2).sum().backward()
    (loop(x2) ** 2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    experts_per_task=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    shared=st.integers(0, 2),
    level_dims=st.lists(
        st.lists(st.integers(1, 6), min_size=1, max_size=2), min_size=1, max_size=3
    ),
    seed=st.integers(0, 1000),
)
def test_equals_loop_reference_property(experts_per_task, shared, level_dims, seed):
    batched, loop = _pair(experts_per_task, shared, level_dims, input_dim=5, seed=seed)
    x = torch.randn(4, 5)
    torch.testing.assert_close(batched(x), loop(x), atol=1e-5, rtol=1e-5)


def test_gates_sum_to_one_and_weights_are_pad_v_plus_g():
    batched, _ = _pair([2, 1, 3], 2, [[8], [6]])
    h = torch.randn(7, 12)
    for level in batched.levels:
        fused, weights = level(h)
        native = level.native_matrix()
        gates = weights - native
        assert (gates >= 0).all()
        torch.testing.assert_close(gates.sum(-1), torch.ones(7, level.fusing_units))
        # pad(v_t): v_t at the unit's own columns, zero elsewhere (learned for m_t = 1 too).
        expected = torch.zeros(level.fusing_units, level.num_experts)
        expected[0, 0:2] = level.native_weights["0"]
        expected[1, 2] = level.native_weights["1"]
        expected[2, 3:6] = level.native_weights["2"]
        if level.fusing_units == 4:
            expected[3, 6:8] = level.native_weights["3"]
        assert torch.equal(native, expected)
        h = fused.transpose(0, 1)
    # The shared unit fuses at level 1 only (4 rows), not at the last level (3 rows).
    assert [level.fusing_units for level in batched.levels] == [4, 3]


PAPER_RULE = (
    "NativeExpertLF: when m_1 = m_2 = ... = m_T = 1, E_t itself with weight 1; otherwise "
    "v_t is learned"  # s. 3.1, after eq. 10; the authors' code learns it in every unit
)


def _adatt_parameters(d0, m_tasks, m_shared, level_dims, tower_dims):
    """The closed count: experts + gates + v per level, then the towers."""
    units = [*m_tasks, *([m_shared] if m_shared else [])]
    T, E, learned = len(m_tasks), sum(units), any(m != 1 for m in units)
    total, width = 0, d0
    for level, dims in enumerate(level_dims):
        widths = [width, *dims]
        per_expert = sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))
        fusing = T if level == len(level_dims) - 1 else len(units)
        total += E * per_expert  # experts
        total += fusing * (width * E + E)  # one gate per fusing unit over all E experts
        total += sum(units[:fusing]) if learned else 0  # v of every fusing unit
        width = dims[-1]
    widths = [width, *tower_dims, 1]
    return total + T * sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))


@pytest.mark.parametrize(
    ("m_tasks", "m_shared", "learned"),
    [
        ([2, 2, 2], 1, True),  # the paper's Census AdaTT: the shared unit learns its v too
        ([1, 1, 1], 3, True),  # one expert per task, three shared: every task unit learns v
        ([1, 1, 1], 1, False),  # every unit has one expert: v fixed to 1
        ([1, 1, 1], 0, False),  # AdaTT-sp with m_t = 1
        ([4, 4], 1, True),
    ],
)
def test_native_weight_follows_the_papers_rule_with_exact_counts(m_tasks, m_shared, learned):
    """PAPER_RULE: which units learn v, and the exact parameter count from the formula."""
    from models.towers import Towers

    level_dims = [[8, 6], [5], [4]]
    adatt = AdaTT(12, m_tasks, m_shared, level_dims)
    for level in adatt.levels:
        want = {str(u) for u in range(level.fusing_units)} if learned else set()
        assert set(level.native_weights.keys()) == want, PAPER_RULE
        native = level.native_matrix()
        for unit in range(level.fusing_units):
            start, m = level.offsets[unit], level.experts_per_unit[unit]
            own = native[unit, start : start + m]
            if learned:
                assert torch.equal(own, level.native_weights[str(unit)].detach())
                bound = (1.0 / m) ** 0.5  # the authors' init U(-sqrt(1/m), sqrt(1/m))
                assert own.abs().max() <= bound
            else:
                assert torch.equal(own, torch.ones(1))
    towers = Towers(4, len(m_tasks), [3])
    count = sum(p.numel() for p in [*adatt.parameters(), *towers.parameters()])
    assert count == _adatt_parameters(12, m_tasks, m_shared, level_dims, [3])


def test_a_checkpoint_without_one_expert_weights_loads_them_as_one():
    """Written before one-expert units of mixed models learned v: they trained with v = 1."""
    level = AdaTTLevel(10, [4], experts_per_unit=[1, 2, 1], fusing_units=3)
    old = {
        k: v
        for k, v in level.state_dict().items()
        if k not in {"native_weights.0", "native_weights.2"}
    }
    fresh = AdaTTLevel(10, [4], experts_per_unit=[1, 2, 1], fusing_units=3)
    fresh.load_state_dict(old)  # strict: nothing missing, nothing unexpected
    assert fresh.native_weights["0"].item() == fresh.native_weights["2"].item() == 1.0
    assert torch.equal(fresh.native_weights["1"], level.native_weights["1"])


def test_zero_shared_experts_is_exactly_adatt_sp():
    torch.manual_seed(3)
    general = AdaTT(12, [2, 1, 2], 0, [[8], [6]])
    torch.manual_seed(3)
    loop_sp = LoopAdaTT(12, [2, 1, 2], 0, [[8], [6]]).load_from(general)
    assert all(level.fusing_units == 3 and level.num_experts == 5 for level in general.levels)
    x = torch.randn(5, 12)
    torch.testing.assert_close(general(x), loop_sp(x), atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_expert_gate_and_native_weight():
    batched, _ = _pair([2, 1, 3], 2, [[8, 7], [6], [5]])
    x = torch.randn(64, 12)
    (batched(x) ** 2).sum().backward()
    for name, p in batched.named_parameters():
        assert p.grad is not None, name
        if p.dim() == 3:  # stacked experts or gates: every slice (expert / gate) gets gradient
            per_slice = p.grad.transpose(0, 1).flatten(1).abs().sum(1)  # [in, G, out]: by G
            assert (per_slice > 0).all(), name
        else:
            assert p.grad.abs().sum() > 0, name
    native = {name for name, _ in batched.named_parameters() if "native" in name}
    # v_t at every level for every task, and for the shared unit below the last level.
    assert native == {
        f"levels.{level}.native_weights.{unit}" for level in range(3) for unit in (0, 1, 2)
    } | {f"levels.{level}.native_weights.3" for level in range(2)}


def test_labels_match_weights():
    adatt = AdaTT(12, [2, 1], 1, [[8], [6]])
    labels = adatt.fusion_weight_labels(["click", "buy"])
    assert labels[0] == (
        ["click", "buy", "shared"],
        ["click/e0", "click/e1", "buy/e0", "shared/e0"],
    )
    assert labels[1][0] == ["click", "buy"]
    _, weights = adatt.forward_with_weights(torch.randn(3, 12))
    assert [tuple(w.shape[1:]) for w in weights] == [(3, 4), (2, 4)]


def test_invalid_arguments_name_the_field():
    with pytest.raises(ValueError, match="tasks"):
        AdaTT(4, [], 1, [[4]])
    with pytest.raises(ValueError, match="experts_per_task"):
        AdaTT(4, [1, 0], 1, [[4]])
    with pytest.raises(ValueError, match="shared_experts"):
        AdaTT(4, [1], -1, [[4]])
    with pytest.raises(ValueError, match="expert_dims"):
        AdaTT(4, [1], 0, [])
