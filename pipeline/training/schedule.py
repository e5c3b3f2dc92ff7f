"""When a worker logs, validates and checkpoints inside an epoch (`train.log_every`,
`train.validate_every`, `train.checkpoint_every`).

An interval is a number of steps (`500`), a duration (`30s`, `15m`, `1h`), `epoch` (at the
end of each epoch only) or `off`. Every worker must take the same decision at the same step
(a report is a collective): step intervals are the same arithmetic on every worker, and the
durations are checked every `SYNC_STEPS` steps with one all-reduce of three flags, so the
slowest clock does not matter and a step pays nothing in between.

The intervals themselves are parsed by `pipeline.intervals`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pipeline.intervals import Interval

SYNC_STEPS = 16  # steps between the checks of duration intervals (one small all-reduce)


@dataclass
class Due:
    """What a step is followed by."""

    log: bool = False
    validate: bool = False
    checkpoint: bool = False

    def __bool__(self) -> bool:
        return self.log or self.validate or self.checkpoint


@dataclass
class Schedule:
    """The three intervals, and when each last fired on this worker.

    Args:
        log, validate, checkpoint: the parsed intervals.
        device: where the flags of the duration check are all-reduced.
    """

    log: Interval
    validate: Interval
    checkpoint: Interval
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    last: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.restart_clocks()

    def restart_clocks(self) -> None:
        """Durations count from now (the start of training, or after a restore)."""
        now = time.monotonic()
        self.last = {"log": now, "validate": now, "checkpoint": now}

    def after_step(self, global_step: int) -> Due:
        """What follows step `global_step` (1-based), the same on every worker."""
        intervals = {"log": self.log, "validate": self.validate, "checkpoint": self.checkpoint}
        due = {k: bool(i.steps) and global_step % i.steps == 0 for k, i in intervals.items()}
        timed = [k for k, i in intervals.items() if i.seconds]
        if timed and global_step % SYNC_STEPS == 0:
            now = time.monotonic()
            flags = [
                float(bool(intervals[k].seconds) and now - self.last[k] >= intervals[k].seconds)
                for k in intervals
            ]
            for key, flag in zip(intervals, _any_worker(flags, self.device), strict=True):
                due[key] = due[key] or flag
        now = time.monotonic()
        for key, fired in due.items():
            if fired:
                self.last[key] = now
        return Due(**due)

    def fired(self, *names: str) -> None:
        """Restart the named clocks (an epoch's end validated and checkpointed anyway)."""
        now = time.monotonic()
        for name in names:
            self.last[name] = now


def _any_worker(flags: list[float], device: torch.device) -> list[bool]:
    tensor = torch.tensor(flags, dtype=torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]
