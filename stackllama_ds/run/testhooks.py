"""Test hooks: the fault injection and slow-downs the fault suite turns on through the environment.

Production code calls these at named points and holds no fault logic itself. Each hook is inert
unless its variable is set: it reads one environment variable and returns at once when that is
unset or names another fault, so a real run pays a dict lookup per call. Variables are read at
call time, so a test may set them after import. ``STACKLLAMA_FAULT`` holds one fault at a time.

=============================  ==========================  ==============================================
variable = format              hook, where it fires        effect
=============================  ==========================  ==============================================
STACKLLAMA_FAULT=              ``fault_value(name, step,   returns ``value * NaN`` at that step, so the
  nan_<name>@<step>            value)``: the step's loss   NaN check stops the run there
                               (``loss``: sft.py, rm.py),
                               PPO's scores (``reward``)
STACKLLAMA_FAULT=              ``on_beat(phase, rank)``:   that rank sleeps 3600 s after beating: a rank
  sleep:<phase>:<rank>         ``Heartbeat.beat``, each    stuck in that phase, for the hang watchdog
                               phase a rank enters
STACKLLAMA_FAULT=              ``checkpoint_fault(         rank 0 SIGKILLs itself: a save cut between
  ckpt_between_files           "ckpt_between_files")``:    files, which resume must ignore
                               ``save_checkpoint``, after
                               rng/ and state.pt, before
                               the manifest
STACKLLAMA_FAULT=              ``checkpoint_fault(         that rank (default 0) raises
  enospc_save[:<rank>]         "enospc_save", path)``:     ``OSError(ENOSPC)`` for ``path``: a full disk
                               the same place
STACKLLAMA_TEST_STEP_SLEEP=    ``after_step()``: each      sleeps that long each step, so a test can
  <seconds>                    training step (sft, rm,     signal or kill mid-run
                               ppo), after its log, before
                               its checkpoint
STACKLLAMA_TEST_SETUP_SLEEP=   ``setup_sleep()``: the end  a child process sleeps that long, as a JIT
  <seconds>                    of ``entry.setup``          build would: a signal to the rank alone
                               (process group joined)      leaves it running, one to the rank's process
                                                           group (as Slurm signals) kills it
STACKLLAMA_TEST_PHASE_SLEEP=   ``phase_sleep(name)``: on   every rank entering that phase sleeps that
  <phase>:<seconds>[,...]      entering                    long inside it, while it beats (a slow
                               ``heartbeat.phase(name)``   export, a slow model load)
STACKLLAMA_TEST_BATCH_SLEEP=   ``batch_sleep(phase)``:     every rank sleeps that long after each batch
  <phase>:<seconds>[,...]      ``Heartbeat.progress``,     of a loop in that phase, before its beat (a
                               each batch of a loop that   slow evaluation; seconds > hang_timeout_s: a
                               beats per batch             batch that hangs)
STACKLLAMA_TEST_DUMP=<dir>     ``dump(name, step, **x)``:  saves ``x`` to <dir>/<name>-<step>-rank<r>.pt:
                               PPO, after each step's      a test recomputes the logged figures from
                               all-reduce                  every rank's raw tensors
=============================  ==========================  ==============================================
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TypeVar

FAULT = "STACKLLAMA_FAULT"
STEP_SLEEP = "STACKLLAMA_TEST_STEP_SLEEP"
SETUP_SLEEP = "STACKLLAMA_TEST_SETUP_SLEEP"
PHASE_SLEEP = "STACKLLAMA_TEST_PHASE_SLEEP"
BATCH_SLEEP = "STACKLLAMA_TEST_BATCH_SLEEP"
DUMP = "STACKLLAMA_TEST_DUMP"
CHECKPOINT_POINTS = ("ckpt_between_files", "enospc_save")
PARK_S = 3600.0  # on_beat's sleep: far beyond any hang timeout a test sets

T = TypeVar("T")


def fault_value(name: str, step: int, value: T) -> T:
    """``value`` times NaN when STACKLLAMA_FAULT is ``nan_<name>@<step>``; else ``value`` itself."""
    if os.environ.get(FAULT) == f"nan_{name}@{step}":
        return value * float("nan")
    return value


def after_step() -> None:
    """Sleep STACKLLAMA_TEST_STEP_SLEEP seconds (when set and > 0) at the end of a training step."""
    delay = os.environ.get(STEP_SLEEP)
    if delay and float(delay) > 0:
        time.sleep(float(delay))


def setup_sleep() -> None:
    """Run ``sleep STACKLLAMA_TEST_SETUP_SLEEP`` (when set and > 0) as a child and wait for it; a child
    killed by a signal raises CalledProcessError, as a killed JIT build fails setup."""
    delay = os.environ.get(SETUP_SLEEP)
    if delay and float(delay) > 0:
        subprocess.run(["sleep", delay], check=True)


def on_beat(phase: str, rank: int) -> None:
    """Park this rank (sleep PARK_S) when STACKLLAMA_FAULT is ``sleep:<phase>:<rank>``."""
    if os.environ.get(FAULT) == f"sleep:{phase}:{rank}":
        time.sleep(PARK_S)


def phase_sleep(name: str) -> None:
    """Sleep the seconds STACKLLAMA_TEST_PHASE_SLEEP gives phase ``name`` (every matching entry)."""
    _sleep_for(PHASE_SLEEP, name)


def batch_sleep(phase: str) -> None:
    """Sleep the seconds STACKLLAMA_TEST_BATCH_SLEEP gives phase ``phase`` (every matching entry)."""
    _sleep_for(BATCH_SLEEP, phase)


def _sleep_for(var: str, name: str) -> None:
    spec = os.environ.get(var)
    if not spec:
        return
    for item in filter(None, spec.split(",")):
        phase, _, secs = item.rpartition(":")  # phase names may hold ':' ("waiting for rank 0: export")
        if phase == name:
            time.sleep(float(secs))


def checkpoint_fault(point: str, where: Path | None = None) -> None:
    """At checkpoint point ``point``: SIGKILL rank 0 (``ckpt_between_files``) or raise ENOSPC for
    ``where`` on the chosen rank (``enospc_save[:<rank>]``), when STACKLLAMA_FAULT names that point."""
    fault = os.environ.get(FAULT)
    if not fault:
        return
    if point not in CHECKPOINT_POINTS:  # a misspelt point would never fire: the test would pass vacuously
        raise ValueError(f"checkpoint_fault: unknown point {point!r}; expected one of {CHECKPOINT_POINTS}")
    name, _, victim = fault.partition(":")
    if name != point:
        return
    # Lazy: dist imports torch, and this module stays importable (and free) without it.
    from stackllama_ds.engines import dist

    if point == "ckpt_between_files" and not victim and dist.is_main():
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "enospc_save" and dist.rank() == int(victim or 0):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))


def dump(name: str, step: int, **values) -> None:
    """Save ``values`` (tensors, lists, dicts) for a test, when STACKLLAMA_TEST_DUMP names a folder."""
    folder = os.environ.get(DUMP)
    if not folder:
        return
    import torch

    Path(folder).mkdir(parents=True, exist_ok=True)
    values = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in values.items()}
    torch.save(values, Path(folder) / f"{name}-{step}-rank{os.environ.get('RANK', '0')}.pt")
