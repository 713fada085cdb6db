"""The two ways a stage ends early that ``entry.run_entry`` maps to exit codes (75 and 1)."""

from __future__ import annotations


class StopForResume(Exception):
    """Raised after a checkpoint taken on SIGTERM/SIGUSR1: exit 75 so the job gets requeued."""


class TrainingError(RuntimeError):
    """A failure with a message for the user (NaN at step N, empty data, ...)."""
