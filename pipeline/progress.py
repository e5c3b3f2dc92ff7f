"""Progress of the long passes on the driver (the pre-flight row check, `adatt generate`).

On a terminal: a live tqdm bar on stderr. In a log (no terminal: CI, a Ray job, a file):
one line every `LOG_INTERVAL_S` seconds and a last one at the end, since a bar redrawn in
place is unreadable there. Either way nothing is shown for a pass shorter than its delay.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_S = 10.0
TERMINAL_DELAY_S = 1.0


def progress(total: int, desc: str, unit: str, scale: bool = False) -> tqdm:
    """A progress bar over `total` `unit`s; use as a context manager and call `update(n)`.
    `scale` shows large counts as 12.6M.

    Example:
        >>> with progress(len(files), "checking rows", "file") as bar:  # doctest: +SKIP
        ...     for file in files:
        ...         bar.update(1)
    """
    common = {"total": total, "desc": desc, "unit": unit, "unit_scale": scale, "file": sys.stderr}
    if sys.stderr.isatty():
        return tqdm(**common, delay=TERMINAL_DELAY_S)
    return tqdm(
        **common,
        delay=LOG_INTERVAL_S,
        mininterval=LOG_INTERVAL_S,
        maxinterval=LOG_INTERVAL_S,
        bar_format="{desc}: {n_fmt}/{total_fmt} {unit}s{postfix} [{elapsed}, {rate_fmt}]\n",
    )
