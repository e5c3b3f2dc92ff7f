"""SIGTERM as an interrupt, so that a stopped run ends KILLED (resumable), not FAILED."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interrupt so that the run ends as KILLED, not FAILED."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM (e.g. `kill`, a scheduler's stop) raises `Terminated`.

    Ray's `ray.init` installs a SIGTERM handler that calls `sys.exit`, which would mark the
    run FAILED; a stop is not a failure. Only the main thread can handle signals: elsewhere
    (e.g. a Tune trial thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except KeyboardInterrupt as err:
        # Raised inside `ray.get`, the handler's exception comes back as a plain
        # KeyboardInterrupt; the flag still tells a SIGTERM from a Ctrl-C.
        if received and not isinstance(err, Terminated):
            raise Terminated(f"signal {received[0]}") from err
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
