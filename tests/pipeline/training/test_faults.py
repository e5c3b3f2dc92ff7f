"""The fault-injection hook: its syntax, and when (epoch, step, rank) a fault fires."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.training.faults import Fault, InjectedFault, fault_trigger, parse_fault


@pytest.mark.parametrize(
    ("spec", "fault"),
    [
        ("raise@2", Fault("raise", 2, 0.0, 0)),
        ("exit@2@1", Fault("exit", 2, 0.0, 1)),
        ("exit@2.5@1", Fault("exit", 2, 0.5, 1)),
        ("hang@3.25", Fault("hang", 3, 0.25, 0)),
        ("nan@2", Fault("nan", 2, 0.0, 0)),
    ],
)
def test_parse_fault_forms(spec: str, fault: Fault) -> None:
    assert parse_fault(spec) == fault


@pytest.mark.parametrize("spec", ["boom@2", "exit", "exit@0", "exit@two", "exit@2@x", "exit@2.5.1"])
def test_malformed_fault_names_the_variable(spec: str) -> None:
    with pytest.raises(
        ConfigError, match=r"ADATT_FAULT=.*expected <raise\|exit\|hang\|nan>@<epoch>"
    ):
        parse_fault(spec)


def test_fault_step_is_a_fraction_of_the_epoch() -> None:
    assert Fault("exit", 2, 0.0).step(16) == 0  # at the start
    assert Fault("exit", 2, 0.5).step(16) == 8
    assert Fault("exit", 1, 0.6).step(10) == 6  # epoch 1: its steps are known beforehand
    assert Fault("exit", 2, 0.01).step(16) == 1  # never before the first step


def _steps_until_fault(trigger, steps: int = 20) -> int | None:
    for done in range(steps):
        try:
            trigger(done, {})
        except InjectedFault:
            return done
    return None


def test_trigger_fires_once_in_its_epoch_rank_and_only_before_a_restore(monkeypatch) -> None:
    monkeypatch.setenv("ADATT_FAULT", "raise@2.5@1")
    assert fault_trigger(epoch=1, rank=1, restored=False, epoch_steps=16) is None
    assert fault_trigger(epoch=2, rank=0, restored=False, epoch_steps=16) is None
    assert fault_trigger(epoch=2, rank=1, restored=True, epoch_steps=16) is None
    trigger = fault_trigger(epoch=2, rank=1, restored=False, epoch_steps=16)
    assert _steps_until_fault(trigger) == 8
    monkeypatch.delenv("ADATT_FAULT")
    assert fault_trigger(epoch=2, rank=1, restored=False, epoch_steps=16) is None


def test_trigger_at_epoch_start_fires_before_the_first_step(monkeypatch) -> None:
    monkeypatch.setenv("ADATT_FAULT", "raise@3")
    trigger = fault_trigger(epoch=3, rank=0, restored=False, epoch_steps=16)
    with pytest.raises(InjectedFault, match="injected failure at epoch 3"):
        trigger(0, {})


def test_nan_fault_spoils_the_labels_of_its_batch(monkeypatch) -> None:
    import torch

    monkeypatch.setenv("ADATT_FAULT", "nan@2")
    trigger = fault_trigger(epoch=2, rank=0, restored=False, epoch_steps=16)
    batch = {"labels": torch.zeros(4, 2)}
    trigger(1, batch)
    assert not batch["labels"].isnan().any()  # not its step
    trigger(0, batch)
    assert batch["labels"].isnan().all()
