"""Ports for the servers the product and the tests start."""

from __future__ import annotations

import socket

from pipeline.ports import PORTS_FROM, ephemeral_start, free_port


def test_free_ports_are_distinct_listenable_and_below_the_ephemeral_range() -> None:
    ephemeral_from = ephemeral_start()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    if ephemeral_from > PORTS_FROM:  # room below it (32768 by default)
        assert all(PORTS_FROM <= p < ephemeral_from for p in ports)
    for port in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
            s.listen()
