"""What reaches the console: output flushed as it is printed, and the progress of the long
passes on the driver (the pre-flight row check, `adatt generate`).

On a terminal: a live tqdm bar on stderr. In a log (no terminal: CI, a Ray job, a file):
one line every `LOG_INTERVAL_S` seconds and a last one at the end, since a bar redrawn in
place is unreadable there. Either way nothing is shown for a pass shorter than its delay.
"""

from __future__ import annotations

import io
import os
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


def flush_as_printed() -> None:
    """Every line printed by this process, and by the processes it starts, reaches the file
    or pipe behind stdout and stderr when it is printed.

    Python buffers a stream that is not a terminal in blocks of 8 KiB, and the lines Ray
    forwards from workers and actors are printed to the driver's `sys.stdout` without a
    flush (`RAY_FLUSH_DRIVER_LOGS` is off by default): under `nohup`, in a Ray job, in CI or
    piped to `tee`, an `adatt train` showed no epoch line until the run ended. Both streams
    become line-buffered, and `PYTHONUNBUFFERED` is set for the processes started from here
    (a local Ray instance's workers; `pipeline.session` passes it to a joined cluster's).
    """
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and not stream.line_buffering:
            stream.reconfigure(line_buffering=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
