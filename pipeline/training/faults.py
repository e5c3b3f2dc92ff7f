"""Fault injection for the fault-tolerance tests: `ADATT_FAULT=<kind>@<epoch>[@<rank>]`.

The driver reads the variable, checks it, and forwards it to the Ray Train workers; each
worker decides on its own whether the fault is its to fire. Forms:

- `raise@2`: rank 0 raises at the start of epoch 2 (the train function fails).
- `exit@2@1`: rank 1 calls `os._exit(1)` at the start of epoch 2, as a crash would.
- `exit@2.5@1`: the same, halfway through epoch 2: after half of its optimiser steps
  (a worker knows its epoch's steps before it starts: `pipeline.data.plan`).
- `hang@2`: rank 0 stops (sleeps) at epoch 2, so a test can kill the driver mid-run;
  `hang@1.6`: at 60 % of epoch 1.
- `nan@2`: rank 0's first batch of epoch 2 gets NaN labels, so the epoch's loss is NaN.

A fault fires only in a worker that started without a checkpoint, so the restarted (or
resumed) run goes on: exactly one failure per run.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.errors import ConfigError

FAULT_ENV = "ADATT_FAULT"
EXIT_DELAY_SECONDS = 5.0
_SPEC = re.compile(r"^(raise|exit|hang|nan)@(\d+)(\.\d+)?(?:@(\d+))?$")
HANG_SECONDS = 3600.0


class InjectedFault(RuntimeError):
    """The failure `raise@...` injects."""


@dataclass(frozen=True)
class Fault:
    """One injected fault.

    Args:
        kind: "raise", "exit" or "hang".
        epoch: the 1-based epoch it fires in.
        fraction: how far into the epoch, in [0, 1); 0 is before the first step.
        rank: the worker rank that fires it.
    """

    kind: str
    epoch: int
    fraction: float = 0.0
    rank: int = 0

    def step(self, epoch_steps: int) -> int:
        """Optimiser steps taken in the epoch (of `epoch_steps`) before the fault fires."""
        if self.fraction == 0:
            return 0
        return max(1, math.floor(self.fraction * epoch_steps))


def parse_fault(spec: str) -> Fault:
    """Parse an `ADATT_FAULT` value; a malformed one is a ConfigError naming the variable.

    Example:
        >>> parse_fault("exit@2.5@1")
        Fault(kind='exit', epoch=2, fraction=0.5, rank=1)
    """
    match = _SPEC.match(spec.strip())
    if not match or int(match.group(2)) < 1:
        raise ConfigError(
            f"{FAULT_ENV}={spec!r}: expected <raise|exit|hang|nan>@<epoch>[.<fraction>][@<rank>], "
            "e.g. exit@2.5@1 (epoch >= 1)"
        )
    kind, epoch, fraction, rank = match.groups()
    return Fault(kind, int(epoch), float(fraction or 0.0), int(rank or 0))


def fault_from_env() -> Fault | None:
    """The fault `ADATT_FAULT` asks for, if any."""
    spec = os.environ.get(FAULT_ENV)
    return parse_fault(spec) if spec else None


def fire(fault: Fault, epoch: int, step: int, batch: dict | None = None) -> None:
    """Carry out `fault` (does not return for `exit`; raises for `raise`; `nan` gives the
    batch NaN labels in a new tensor, never writing into what the batch views: the cache)."""
    where = f"epoch {epoch}, step {step}"
    if fault.kind == "nan":
        print(f"{FAULT_ENV}: rank {fault.rank} feeds NaN labels at {where}", flush=True)
        batch["labels"] = batch["labels"].clone().fill_(float("nan"))
        return
    if fault.kind == "exit":
        print(f"{FAULT_ENV}: rank {fault.rank} exits at {where}", flush=True)
        # Ray Train's controller registers the previous epoch's checkpoint asynchronously;
        # a crash a fraction of a second after that report could beat it, and the restart
        # would then (correctly) begin from scratch. Wait so that the test exercises the
        # restart from a checkpoint it means to test.
        time.sleep(EXIT_DELAY_SECONDS)
        os._exit(1)
    if fault.kind == "hang":
        print(f"{FAULT_ENV}: rank {fault.rank} hangs at {where}", flush=True)
        time.sleep(HANG_SECONDS)
    raise InjectedFault(f"{FAULT_ENV}: injected failure at epoch {epoch}")


def fault_trigger(
    epoch: int, rank: int, restored: bool, epoch_steps: int
) -> Callable[[int, dict], None] | None:
    """A per-step callback that fires this worker's fault in `epoch` (of `epoch_steps`
    steps), or None.

    Call it with the number of steps done so far in the epoch and the next batch, before
    each step; it fires when that number reaches the fault's step.
    """
    fault = fault_from_env()
    if fault is None or restored or fault.epoch != epoch or fault.rank != rank:
        return None
    at = fault.step(epoch_steps)

    def trigger(steps_done: int, batch: dict) -> None:
        if steps_done == at:
            fire(fault, epoch, steps_done, batch)

    return trigger
