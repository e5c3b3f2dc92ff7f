"""The optimiser: one learning rate, or a separate one for the embedding tables, and the
per-epoch learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError
from pipeline.training.losses import build_training_model
from pipeline.training.optim import embedding_tables, lr_factor, make_optimizer, set_epoch_lr


def _config(**train) -> Config:
    return load_config("configs/synthetic.yaml", [f"train.{k}={v}" for k, v in train.items()])


def _step(config: Config) -> dict[str, torch.Tensor]:
    """Parameters after one Adam step from the same start and gradients."""
    torch.manual_seed(0)
    module = build_training_model(config)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    optimizer = make_optimizer(module.parameters(), config.train, embedding_tables(module))
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    return {n: (p.detach() - before[n]).abs().max() for n, p in module.named_parameters()}


def test_embedding_tables_get_their_own_learning_rate() -> None:
    moved = _step(_config(lr=0.001, embedding_lr=0.01))
    tables = [n for n in moved if ".embeddings." in n]
    assert len(tables) == 6  # the six categorical features of configs/synthetic.yaml
    # Adam's first step moves every parameter by its learning rate (gradients of one sign).
    for name, step in moved.items():
        expected = 0.01 if name in tables else 0.001
        assert float(step) == pytest.approx(expected, rel=1e-3), name


def test_without_embedding_lr_every_parameter_uses_lr() -> None:
    config = _config(lr=0.002, embedding_lr="null")
    module = build_training_model(config)
    optimizer = make_optimizer(module.parameters(), config.train, embedding_tables(module))
    assert [g["lr"] for g in optimizer.param_groups] == [0.002]


def test_embedding_lr_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="embedding_lr"):
        _config(embedding_lr=0)


def test_constant_schedule_keeps_the_rate() -> None:
    assert [lr_factor("constant", e, 5) for e in range(1, 6)] == [1.0] * 5


def test_cosine_schedule_takes_the_cosine_at_each_epochs_midpoint() -> None:
    factors = [lr_factor("cosine", e, 4) for e in range(1, 5)]
    expected = [(1 + math.cos(math.pi * (e - 0.5) / 4)) / 2 for e in range(1, 5)]
    assert factors == pytest.approx(expected)
    assert factors == pytest.approx([0.9619, 0.6913, 0.3087, 0.0381], abs=1e-4)
    # Symmetric about the middle of training, and near 0 (never 0) in the last of 12 epochs.
    assert factors[0] + factors[3] == pytest.approx(1.0)
    assert 0 < lr_factor("cosine", 12, 12) < 0.005


def test_cosine_schedule_scales_both_groups_from_the_config_rates() -> None:
    config = _config(lr=0.001, embedding_lr=0.01, lr_schedule="cosine", epochs=4)
    module = build_training_model(config)
    optimizer = make_optimizer(module.parameters(), config.train, embedding_tables(module))
    base = [g["lr"] for g in optimizer.param_groups]
    assert set_epoch_lr(optimizer, base, config.train, 2) == pytest.approx(0.001 * 0.6913, 1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(
        [0.001 * 0.6913, 0.01 * 0.6913], rel=1e-3
    )
    # A resumed run restores epoch 2's scaled rates with the optimiser state; epoch 3 still
    # starts from the config's rates, so the decay does not compound.
    restored = make_optimizer(module.parameters(), config.train, embedding_tables(module))
    base = [g["lr"] for g in restored.param_groups]
    restored.load_state_dict(optimizer.state_dict())
    set_epoch_lr(restored, base, config.train, 3)
    assert [g["lr"] for g in restored.param_groups] == pytest.approx(
        [0.001 * 0.3087, 0.01 * 0.3087], rel=1e-3
    )


def test_unknown_schedule_is_rejected_by_name() -> None:
    with pytest.raises(ConfigError, match="lr_schedule"):
        _config(lr_schedule="step")
