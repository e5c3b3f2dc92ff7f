"""The progress of a training on the driver's console: one source for every worker.

Rank 0 posts where the epoch stands (`ProgressBoard.update`, fire-and-forget, every few
seconds) to a small actor the driver owns; a thread of the driver reads it every second.
On a terminal it draws a live bar; in a log (a Ray job, CI, a file) it prints one line every
`train.progress_every`: rows done of the epoch's rows (counted before the run), samples/s
over the last interval, and the time left in the epoch and in the run (training time: the
validation passes come on top). The per-epoch summary line stays (`RunLogger`).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ray

POLL_S = 1.0


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Holds rank 0's latest post: epoch, rows done in it (all workers), rows per epoch."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] | None = None

    def update(self, **fields: Any) -> None:
        self.latest = fields

    def read(self) -> dict[str, Any] | None:
        return self.latest


def duration(seconds: float) -> str:
    """`1 h 02 min`, `3 min 05 s`, `42 s`.

    Example:
        >>> duration(42.4), duration(185), duration(3725)
        ('42 s', '3 min 05 s', '1 h 02 min')
    """
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@dataclass
class _Rate:
    """Rows trained over time, from the posts seen."""

    epochs: int
    last: tuple[float, float] | None = None  # (time, rows trained in the run)

    @staticmethod
    def done(post: dict[str, Any]) -> float:
        return (post["epoch"] - 1) * post["rows_per_epoch"] + post["rows"]

    def start(self, post: dict[str, Any], now: float) -> None:
        """The first post seen: where the first line's rate is measured from."""
        if self.last is None:
            self.last = (now, self.done(post))

    def line(self, post: dict[str, Any], now: float) -> str:
        per_epoch = post["rows_per_epoch"]
        done = self.done(post)
        rate = 0.0
        if self.last is not None and now > self.last[0]:
            rate = (done - self.last[1]) / (now - self.last[0])
        self.last = (now, done)
        share = post["rows"] / max(per_epoch, 1)
        text = (
            f"epoch {post['epoch']}/{self.epochs}: {post['rows']:,} of {per_epoch:,} rows "
            f"({share:.0%})"
        )
        if rate > 0:
            epoch_left = (per_epoch - post["rows"]) / rate
            run_left = (self.epochs * per_epoch - done) / rate
            text += (
                f", {rate:,.0f} samples/s, epoch ETA {duration(epoch_left)}, "
                f"run ETA {duration(run_left)}"
            )
        return text


@contextlib.contextmanager
def progress_shown(
    board: Any, epochs: int, every_s: float, echo: Callable[[str], None]
) -> Iterator[None]:
    """While inside, show the board's progress: a bar on a terminal, else a line every
    `every_s` seconds through `echo`."""
    stop = threading.Event()
    terminal = sys.stderr.isatty()
    rate = _Rate(epochs)

    def watch() -> None:
        bar, shown, printed = None, None, time.monotonic()
        while not stop.wait(POLL_S):
            try:
                post = ray.get(board.read.remote(), timeout=10)
            except Exception:  # the board is only for show: never fail the run over it
                continue
            if post is None or post == shown:
                continue
            shown = post
            rate.start(post, time.monotonic())
            if terminal:
                bar = _draw(bar, post, epochs)
            elif time.monotonic() - printed >= every_s:
                printed = time.monotonic()
                echo(rate.line(post, printed))
        if bar is not None:
            bar.close()

    thread = threading.Thread(target=watch, name="training-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _draw(bar: Any, post: dict[str, Any], epochs: int) -> Any:
    from tqdm import tqdm

    desc = f"epoch {post['epoch']}/{epochs}"
    if bar is None or bar.desc != desc:
        if bar is not None:
            bar.close()
        bar = tqdm(total=post["rows_per_epoch"], desc=desc, unit="row", unit_scale=True)
    bar.n = post["rows"]
    bar.refresh()
    return bar
