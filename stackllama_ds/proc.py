"""Process-level facts the launchers and the ranks share, without importing torch."""

from __future__ import annotations

import socket

EXIT_RESUME = 75  # EX_TEMPFAIL: stopped on a signal after a checkpoint; requeue and resume me
EXIT_HANG = 86  # the hang watchdog found a rank stuck (report in <stage>/heartbeat/hang.json)


def free_port() -> int:
    """A TCP port free on this host now (for MASTER_PORT of a single-node group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
