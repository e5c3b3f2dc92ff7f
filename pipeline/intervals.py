"""Intervals of the config (`train.log_every`, `validate_every`, `checkpoint_every`,
`progress_every`): a number of steps (`500`), a duration (`30s`, `15m`, `1h`), `epoch` (at
the end of each epoch only) or `off`.

Example:
    >>> parse_interval("15m"), parse_interval(500), parse_interval("epoch")
    (Interval(steps=0, seconds=900.0), Interval(steps=500, seconds=0.0), Interval(steps=0, seconds=0.0))
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h)$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Interval:
    """Every `steps` steps, or every `seconds` seconds; neither: at epoch ends only."""

    steps: int = 0
    seconds: float = 0.0


def parse_interval(value: int | str | None) -> Interval:
    """A config interval: steps (an int, or its digits), a duration (`90s`, `15m`, `2h`),
    `epoch` or `off` (both: no interval inside an epoch). ValueError otherwise."""
    if value is None:
        return Interval()
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"{value}: a number of steps must be at least 1")
        return Interval(steps=value)
    text = str(value).strip().lower()
    if text in ("epoch", "off"):
        return Interval()
    if text.isdigit():
        return parse_interval(int(text))
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(
            f"{value!r}: expected a number of steps (500), a duration (30s, 15m, 1h), epoch or off"
        )
    return Interval(seconds=float(match.group(1)) * _UNITS[match.group(2)])
