"""The optimiser: one learning rate, or a separate one for the embedding tables."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError
from pipeline.train_loop import build_training_model, make_optimizer


def _config(**train) -> Config:
    return load_config("configs/synthetic.yaml", [f"train.{k}={v}" for k, v in train.items()])


def _step(config: Config) -> dict[str, torch.Tensor]:
    """Parameters after one Adam step from the same start and gradients."""
    torch.manual_seed(0)
    module = build_training_model(config)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    optimizer = make_optimizer(module, config.train)
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
    optimizer = make_optimizer(build_training_model(config), config.train)
    assert [g["lr"] for g in optimizer.param_groups] == [0.002]


def test_embedding_lr_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="embedding_lr"):
        _config(embedding_lr=0)
