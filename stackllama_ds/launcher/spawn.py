"""Spawn and supervise the ranks of one node when a command starts without RANK/WORLD_SIZE.

Unlike torchrun, a dead rank ends the job at once: the supervisor polls its children, kills the
survivors (which would otherwise block in a collective until the timeout) and names the rank.
Exit code: 0 when all ranks finish, 75 when they stopped for resume, else the first failure's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from stackllama_ds.hardware import free_port, has_cuda
from stackllama_ds.run.signals import EXIT_RESUME

# glibc returns every freed block over 128 KiB to the kernel, so each step's activations, gradients
# and fp32 copies are page-faulted and zeroed afresh. Keeping them in the heap is faster (bench/RESULTS.md,
# "What changed in session 2"). Set for every rank unless the user set them.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),  # glibc's maximum: blocks up to 32 MiB come from the heap
    "MALLOC_TRIM_THRESHOLD_": str(4 << 30),  # and are not trimmed back to the kernel after each step
    "MALLOC_TOP_PAD_": str(512 << 20),
}


def rank_env(nproc: int, rank: int, port: int, cuda: bool, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PYTHONUNBUFFERED="1",
    )
    if not cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
    # The deepspeed launcher leaves this unset, and ranks then oversubscribe the cores (much slower).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    for k, v in MALLOC_ENV.items():
        env.setdefault(k, v)
    return env


def _die_with_parent() -> None:
    """Linux: a rank gets SIGKILL when its supervisor dies (even by SIGKILL), so no orphan rank keeps
    training beside a rerun; the rerun resumes from the last complete checkpoint."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def spawn(argv: list[str], nproc: int, poll_s: float = 0.2, grace_s: float = 5.0) -> int:
    """Run ``python -m stackllama_ds.cli *argv`` on ``nproc`` local ranks and supervise them."""
    cuda = has_cuda()
    port = free_port()
    procs: list[subprocess.Popen] = []

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    # Installed before the ranks start, so a signal in between is forwarded, not fatal to us.
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        for r in range(nproc):
            cmd = [sys.executable, "-m", "stackllama_ds.cli", *argv]
            procs.append(subprocess.Popen(cmd, env=rank_env(nproc, r, port, cuda), start_new_session=True,
                                          preexec_fn=_die_with_parent))
        failed: tuple[int, int] | None = None
        while True:
            codes = [p.poll() for p in procs]
            # Checked before "all exited": the survivors of a killed rank often fail within one poll.
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0, EXIT_RESUME)]
            if bad:
                # A rank killed by a signal is the cause; the others' "connection closed" errors follow.
                failed = min(bad, key=lambda rc: (rc[1] > 0, rc[0]))
                break
            if all(c is not None for c in codes):
                break
            time.sleep(poll_s)
        if failed is not None:
            r, c = failed
            print(f"stackllama-ds: rank {r} (pid {procs[r].pid}) {describe(c)}; stopping the other ranks",
                  file=sys.stderr, flush=True)
            deadline = time.time() + grace_s
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
            while time.time() < deadline and any(p.poll() is None for p in procs):
                time.sleep(poll_s)
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            return c if c > 0 else 1
        codes = [p.returncode for p in procs]
        if all(c == 0 for c in codes):
            return 0
        if all(c in (0, EXIT_RESUME) for c in codes):
            return EXIT_RESUME
        return next(c for c in codes if c != 0)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
