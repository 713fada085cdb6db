"""Process-level facts the launchers and the ranks share, without importing torch."""

from __future__ import annotations

import signal
import socket

EXIT_RESUME = 75  # EX_TEMPFAIL: stopped on a signal after a checkpoint; requeue and resume me
EXIT_HANG = 86  # the hang watchdog found a rank stuck (report in <stage>/heartbeat/hang.json)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # Slurm's preemption and time-limit warnings
_early_signal: int | None = None


def catch_stop_signals_early() -> None:
    """Remember SIGTERM/SIGUSR1 from the first moment of a rank, before torch and the models are
    imported (tens of seconds); ``checkpoint.StopSignal`` takes the flag over, so a stop there
    ends the rank with exit 75 like one during setup, instead of killing it (exit 1)."""

    def remember(signum: int, frame) -> None:
        global _early_signal
        _early_signal = signum

    for s in STOP_SIGNALS:
        signal.signal(s, remember)


def early_stop_signal() -> int | None:
    """The stop signal ``catch_stop_signals_early`` recorded, if any."""
    return _early_signal


def free_port() -> int:
    """A TCP port free on this host now (for MASTER_PORT of a single-node group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
