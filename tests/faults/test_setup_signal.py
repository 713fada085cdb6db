"""A stop signal during setup (process group, model load, engine build) exits 75 like one during
training, and the rerun completes.

Setup is slowed by STACKLLAMA_TEST_SETUP_SLEEP, which runs ``sleep`` as a child of each rank, as a
JIT build would. Two deliveries: to the launcher, which forwards it to the ranks only (the child
lives on, the rank stops when setup is done, before any step); and to each rank's process group,
as Slurm signals every process of a job step (the child dies and fails setup: still 75).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from stackllama_ds.config import RunConfig
from stackllama_ds.run import entry
from stackllama_ds.run.signals import EXIT_RESUME, StopSignal
from tests.conftest import fresh_root, write_config
from tests.faults import _harness as h

SETUP_SFT = {"max_steps": 4, "save_every": 2, "eval_every": 100, "seq_length": 128}
SETUP_SLEEP_S = 12  # long enough to be seen and signalled; the launcher case waits it out


def _fail(cfg: RunConfig) -> None:
    raise RuntimeError("Error building extension 'deepspeed_shm_comm'")


def test_failure_after_a_stop_signal_exits_75_else_1(monkeypatch):
    monkeypatch.setattr(StopSignal, "received", None)
    assert entry.run_entry(_fail, RunConfig()) == 1
    monkeypatch.setattr(StopSignal, "received", int(signal.SIGTERM))
    assert entry.run_entry(_fail, RunConfig()) == EXIT_RESUME


def test_signal_before_the_imports_reaches_stop_signal(monkeypatch):
    """A stop signal while the rank still imports torch is remembered, and StopSignal takes it over."""
    from stackllama_ds.run import signals as proc

    saved = {s: signal.getsignal(s) for s in proc.STOP_SIGNALS}
    monkeypatch.setattr(StopSignal, "received", None)
    monkeypatch.setattr(proc, "_early_signal", None)
    try:
        proc.catch_stop_signals_early()
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process with the default handler
        assert proc.early_stop_signal() == signal.SIGUSR1
        stop = StopSignal()
        assert stop.flag and stop.signum == signal.SIGUSR1 and StopSignal.received == signal.SIGUSR1
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _setup_child(rank_pid: int, p, timeout: float = 240) -> int:
    """The pid of the ``sleep`` the setup hook runs under ``rank_pid``, once it exists."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                comm = (d / "comm").read_text().strip()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == rank_pid and comm == "sleep":
                return int(d.name)
        if p.poll() is not None:
            raise AssertionError(f"run ended (rc {p.returncode}) before setup:\n{p.communicate()[1][-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no setup child of rank pid {rank_pid} in {timeout} s")


def _in_setup(p) -> list[int]:
    """Both ranks' pids, once both sit in the setup hook (process group joined)."""
    pids = []
    for r in (0, 1):
        deadline = time.time() + 120
        while True:
            try:
                pids.append(h.rank_pid(p.pid, r))
                break
            except AssertionError:
                if time.time() > deadline or p.poll() is not None:
                    raise
                time.sleep(0.05)
    for pid in pids:
        _setup_child(pid, p)
    return pids


@pytest.mark.slow
def test_signal_during_setup_exits_75_and_the_rerun_completes(prepared_root, tmp_path):
    root = fresh_root(prepared_root, tmp_path / "run")
    cfg = write_config(root / "cfg.yaml", root, sft=SETUP_SFT)
    sft = root / "sft"

    # 1. SIGTERM to the launcher: forwarded to the ranks, not to their children. Setup finishes, then
    # the stage stops before step 1: nothing trained, nothing to checkpoint.
    p = h.start("sft", cfg, STACKLLAMA_TEST_SETUP_SLEEP=str(SETUP_SLEEP_S))
    _in_setup(p)
    t_sig = time.time()
    p.send_signal(signal.SIGTERM)
    r = h.finish(p, t_sig, timeout=300)
    h.record("SIGTERM to the launcher during setup", f"rc {r.rc}", r.wall_s, "nothing (no step trained yet)")
    assert r.rc == EXIT_RESUME, r.err[-3000:]
    h.no_traceback(r.err)
    assert h.rows_of(sft) == [] and h.ckpt_names(sft / "checkpoints") == set(), r.err[-3000:]

    # 2. SIGUSR1 to each rank's process group (as Slurm delivers it): the setup child dies of it and
    # setup fails; the rank still exits 75, not 1.
    p = h.start("sft", cfg, STACKLLAMA_TEST_SETUP_SLEEP=str(SETUP_SLEEP_S))
    pids = _in_setup(p)
    t_sig = time.time()
    for pid in pids:
        os.killpg(pid, signal.SIGUSR1)
    r = h.finish(p, t_sig, timeout=300)
    h.record("SIGUSR1 to the ranks' process groups during setup (child killed)", f"rc {r.rc}", r.wall_s,
             "nothing (no step trained yet)")
    assert r.rc == EXIT_RESUME, r.err[-3000:]
    assert "stopped for resume on rank 0: SIGUSR1, then CalledProcessError" in r.err, r.err[-3000:]
    h.no_traceback(r.err)

    # 3. The rerun trains every step and finishes.
    r = h.run("sft", cfg, timeout=600)
    assert r.rc == 0, r.err[-3000:]
    assert [row["step"] for row in h.rows_of(sft) if "loss" in row][-1] == SETUP_SFT["max_steps"]
    assert (sft / "DONE").exists()
