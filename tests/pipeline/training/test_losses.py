"""Masked multi-task losses: missing labels contribute nothing; weighting schemes."""

from __future__ import annotations

import pytest
import torch

from pipeline.training.losses import MultiTaskLoss


def _batch(n: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    outputs = torch.randn(n, 2, generator=g, requires_grad=True)
    labels = torch.stack(
        [(torch.rand(n, generator=g) < 0.3).float(), torch.randn(n, generator=g)], 1
    )
    mask = (torch.rand(n, 2, generator=g) < 0.5).float()
    return outputs, labels, mask


def test_masked_labels_do_not_move_loss_or_gradients() -> None:
    outputs, labels, mask = _batch()
    loss = MultiTaskLoss(["binary", "regression"], [1.0, 1.0])
    total_a, _ = loss(outputs, labels, mask)
    (grad_a,) = torch.autograd.grad(total_a, outputs)
    garbage = torch.where(mask > 0, labels, torch.full_like(labels, 1e6))
    total_b, _ = loss(outputs, garbage, mask)
    (grad_b,) = torch.autograd.grad(total_b, outputs)
    assert float(total_a.detach()) == pytest.approx(float(total_b.detach()))
    assert torch.equal(grad_a, grad_b)
    assert torch.all(grad_a[mask == 0] == 0)


def test_per_task_loss_is_mean_over_observed_rows() -> None:
    outputs, labels, mask = _batch()
    loss = MultiTaskLoss(["binary", "regression"], [2.0, 0.5])
    total, per_task = loss(outputs, labels, mask)
    keep = mask[:, 1].bool()
    mse = ((outputs[keep, 1] - labels[keep, 1]) ** 2).mean()
    keep0 = mask[:, 0].bool()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(outputs[keep0, 0], labels[keep0, 0])
    assert float(per_task[1]) == pytest.approx(float(mse), rel=1e-5)
    assert float(total) == pytest.approx(2.0 * float(bce) + 0.5 * float(mse), rel=1e-5)


def test_task_with_no_observed_label_gives_zero_loss() -> None:
    outputs, labels, mask = _batch()
    mask[:, 0] = 0
    _, per_task = MultiTaskLoss(["binary", "regression"], [1.0, 1.0])(outputs, labels, mask)
    assert float(per_task[0]) == 0.0


def test_uncertainty_weighting_learns_log_variances() -> None:
    outputs, labels, mask = _batch()
    loss = MultiTaskLoss(["binary", "regression"], [1.0, 1.0], weighting="uncertainty")
    assert loss.log_vars is not None and loss.log_vars.shape == (2,)
    total, per_task = loss(outputs, labels, mask)
    # At s = 0 the terms are L_binary + L_regression / 2.
    assert float(total) == pytest.approx(float(per_task[0] + 0.5 * per_task[1]), rel=1e-5)
    total.backward()
    assert loss.log_vars.grad is not None and torch.all(loss.log_vars.grad != 0)


def test_mismatched_weights_raise() -> None:
    with pytest.raises(ValueError, match="one entry per task"):
        MultiTaskLoss(["binary"], [1.0, 2.0])
