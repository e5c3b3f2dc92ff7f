"""A free TCP port for a server this process is about to start (a local Ray head, and the
tests' servers)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

PORTS_FROM = 20_000  # above Ray's worker ports (10002-19999 by default)
_GIVEN: set[int] = set()


def ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (outgoing connections' ports), 0
    where it cannot be read."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port(host: str = "") -> int:
    """A TCP port free on `host` now ("": every interface), never the same twice in a
    process.

    Taken from below the kernel's ephemeral range where there is room: a port of that range
    (what binding port 0 gives) can be taken by any process's outgoing connection between
    this check and the server's listen (seen once in CI: a test's rendezvous failed with
    EADDRINUSE), whereas ports below it are only ever taken by name.
    """
    candidates = [p for p in range(PORTS_FROM, ephemeral_start()) if p not in _GIVEN]
    # The system's randomness: a program that seeds `random` would make processes pick alike.
    for port in random.SystemRandom().sample(candidates, min(64, len(candidates))):
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket() as sock:  # no room below the ephemeral range: any free port
        sock.bind((host, 0))
        return sock.getsockname()[1]
