"""Exit codes and stop signals, shared by the launchers and the ranks (importing this module loads no torch)."""

from __future__ import annotations

import signal

EXIT_RESUME = 75  # EX_TEMPFAIL: stopped on a signal after a checkpoint; requeue and resume me
EXIT_HANG = 86  # the hang watchdog found a rank stuck (report in <stage>/heartbeat/hang.json)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # Slurm's preemption and time-limit warnings
_early_signal: int | None = None


def catch_stop_signals_early() -> None:
    """Remember SIGTERM/SIGUSR1 from the first moment of a rank, before torch and the models are
    imported (tens of seconds); ``StopSignal`` takes the flag over, so a stop there
    ends the rank with exit 75 like one during setup, instead of killing it (exit 1)."""

    def remember(signum: int, frame) -> None:
        global _early_signal
        _early_signal = signum

    for s in STOP_SIGNALS:
        signal.signal(s, remember)


def early_stop_signal() -> int | None:
    """The stop signal ``catch_stop_signals_early`` recorded, if any."""
    return _early_signal


class StopSignal:
    """Turn SIGTERM/SIGUSR1 (Slurm's preemption and time-limit warnings) into a flag.

    The loop checks ``requested()`` (all ranks agree) at each step boundary, checkpoints and exits 75;
    a stage checks it once more when setup is done, so a signal during setup exits 75 before any step.
    ``received`` is class-wide: ``entry.run_entry`` reads it to map a setup failure the signal caused
    (Slurm signals every process of the step, so a child such as a build dies of it) to 75 as well.
    """

    received: int | None = None  # the last stop signal this process got

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.flag = False
        self.signum: int | None = None
        if early_stop_signal() is not None:  # arrived while the rank was still importing
            self._handler(early_stop_signal(), None)
        for s in signals:
            signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:
        self.flag = True
        self.signum = signum
        StopSignal.received = signum

    def requested(self) -> bool:
        from stackllama_ds.engines import dist  # torch: not at import, the launchers read the exit codes

        return dist.any_rank(self.flag)
