"""``free_port`` must hand out ports the kernel never gives an outgoing connection.

CI once failed because ``pulse serve`` could not bind the port chosen for it: the port came from the
ephemeral range, and in the moment between choosing and binding an outgoing connection (the server's own
to PostgreSQL, while it migrated) was given that same port as its local end.
"""

import socket
from pathlib import Path

import pytest

from pulse.tools.launcher import free_port

RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


@pytest.mark.skipif(not RANGE.exists(), reason="no Linux ephemeral port range to stay out of")
def test_free_ports_lie_outside_the_ephemeral_range_and_can_be_bound():
    low, high = map(int, RANGE.read_text().split())
    ports = {free_port() for _ in range(50)}
    assert all(not (low <= p <= high) for p in ports), sorted(ports)
    assert len(ports) > 40  # random, so two callers rarely meet on one port
    for port in list(ports)[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
